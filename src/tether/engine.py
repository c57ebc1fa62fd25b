"""The one optimiser loop every stage uses: AdamW, warm-up + schedule, gradient clipping,
a guard against non-finite steps, metric logging (JSONL + console) and progress bars.

Algorithms own their data loops; they call ``engine.step()`` once per optimiser step after
``backward`` on each micro-batch (gradient accumulation is the algorithm's loop).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable

import torch

from tether.config import OptimConfig

__all__ = ["Engine", "MetricsLogger", "NonFiniteError", "progress_bar", "plan_steps", "batch_indices", "BatchPlan",
           "length_groups", "token_budget"]


from tether.errors import NonFiniteError  # noqa: E402 - re-exported here


def progress_bar(total: int, desc: str, unit: str = "step"):
    """A tqdm progress bar with ETA (quiet when not a terminal and TETHER_QUIET is set)."""
    import os

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True,
                disable=os.environ.get("TETHER_QUIET") == "1")


def plan_steps(n_items: int, batch_size: int, epochs: float, max_steps: int = 0) -> int:
    """Optimiser steps for ``epochs`` passes over ``n_items`` (or ``max_steps`` when set)."""
    return max_steps or max(1, math.ceil(epochs * max(1, n_items // batch_size)))


def batch_indices(n_items: int, batch_size: int, micro_batch_size: int, steps: int, generator: torch.Generator):
    """Yield, for each optimiser step, its micro-batches of item indices (see :class:`BatchPlan`)."""
    plan = BatchPlan(n_items, batch_size, micro_batch_size, generator)
    for _ in range(steps):
        yield plan.next()


class BatchPlan:
    """The data position of a stage: each optimiser step's micro-batches of item indices.

    Items are drawn in a fresh random permutation each epoch; a step that crosses an epoch
    boundary takes the rest of one permutation and the start of the next. ``state_dict``
    holds the generator and what is left of the current permutation, so a resumed stage
    sees exactly the batches it would have seen.
    """

    def __init__(self, n_items: int, batch_size: int, micro_batch_size: int, generator: torch.Generator):
        self.n_items, self.batch_size, self.micro_batch_size = n_items, batch_size, micro_batch_size
        self.generator = generator
        self.order: list[int] = []

    def next(self) -> list[list[int]]:
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(self.n_items, generator=self.generator).tolist()
        batch, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return [batch[j : j + self.micro_batch_size] for j in range(0, self.batch_size, self.micro_batch_size)]

    def state_dict(self) -> dict:
        return {"order": list(self.order), "generator": self.generator.get_state(), "n_items": self.n_items}

    def load_state_dict(self, state: dict) -> None:
        if state["n_items"] != self.n_items:
            raise ValueError(f"the checkpoint's data had {state['n_items']} items, this run's {self.n_items}")
        self.order = list(state["order"])
        self.generator.set_state(state["generator"])


def token_budget(micro_batch_tokens: int, device: torch.device | str = "cpu") -> int:
    """``optim.micro_batch_tokens`` resolved: -1 (auto) is 512 padded tokens per forward pass
    on a CPU (where a pass costs its tokens and small matrices lose little) and 16384 on
    an accelerator (where bigger passes fill the device); 0 stays off."""
    if micro_batch_tokens != -1:
        return micro_batch_tokens
    return 512 if torch.device(device).type == "cpu" else 16384


def length_groups(micro: list[list[int]], cost, max_items: int, max_tokens: int) -> list[list[int]]:
    """The items of one optimiser step (``micro``: the plan's micro-batches) regrouped into
    forward passes of similar length.

    ``cost(i)`` → (rows, length): the rows item ``i`` adds to a pass and the padded length
    of its longest row. Items are sorted by length and cut into passes of at most
    ``max_items`` items and ``rows × longest ≤ max_tokens`` padded tokens (an item too big
    alone is a pass of its own). The same items give the same gradient (the losses are
    normalised over the whole step), up to the order of float sums; with less padding and
    smaller activations. ``max_tokens`` 0 keeps the plan's micro-batches as they are.
    """
    if max_tokens <= 0:
        return micro
    costs = {i: cost(i) for m in micro for i in m}  # once per item (a cost may tokenise)
    items = sorted((i for m in micro for i in m), key=lambda i: (costs[i][1], i))  # repeats kept
    groups: list[list[int]] = []
    rows = longest = 0
    for i in items:
        r, length = costs[i]
        if groups and groups[-1] and len(groups[-1]) < max_items and (rows + r) * max(longest, length) <= max_tokens:
            groups[-1].append(i)
            rows, longest = rows + r, max(longest, length)
        else:
            groups.append([i])
            rows, longest = r, length
    return groups


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and, when asked, sends
    the numbers to trackers: ``tensorboard`` (event files under ``tensorboard_dir``), and
    ``wandb``, ``mlflow`` or ``trackio`` when they are installed (a tracker that is asked
    for but missing is skipped with one warning; the run goes on).
    """

    def __init__(self, path: str | Path | None, *, trackers: Iterable[str] = (), tensorboard_dir: str | Path | None = None,
                 run_name: str = "tether", project: str = "tether"):
        self.path = Path(path) if path else None
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        self.history: list[dict] = []
        self._sinks: list = []
        for name in trackers:
            try:
                self._sinks.append(_open_tracker(name, tensorboard_dir, run_name, project))
            except ValueError:
                raise
            except ImportError as exc:
                _warn(f"tracker '{name}' asked for but not installed ({exc}); metrics go to {self.path} only")
            except Exception as exc:  # not logged in, server unreachable...: the run goes on
                _warn(f"tracker '{name}' could not start ({type(exc).__name__}: {exc}); metrics go to {self.path} only")

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().item()
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            row[key] = value
        self.history.append(row)
        if self._fh is not None:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()
        numbers = {k: float(v) for k, v in row.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in list(self._sinks):
            try:
                sink(int(step), numbers)
            except Exception as exc:  # a tracker failing mid-run loses its own metrics, not the run
                _warn(f"a metrics tracker failed ({type(exc).__name__}: {exc}) and is dropped; "
                      f"metrics still go to {self.path}")
                self._sinks.remove(sink)
        return row

    def state_dict(self) -> dict:
        """Where ``metrics.jsonl`` ends now (a resumed stage cuts off what came after)."""
        if self._fh is not None:
            self._fh.flush()
            return {"offset": self._fh.tell(), "rows": len(self.history)}
        return {"offset": None, "rows": len(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Cut ``metrics.jsonl`` back to the checkpoint: rows a killed run logged after it go
        (the resumed run logs them again)."""
        if self._fh is not None and state.get("offset") is not None and self._fh.tell() > state["offset"]:
            self._fh.flush()
            self._fh.truncate(state["offset"])
            self._fh.seek(0, 2)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self._sinks = []


def _warn(msg: str) -> None:
    import warnings

    warnings.warn(msg, stacklevel=3)


class _Sink:
    def __init__(self, log, close=None):
        self._log, self.close = log, close or (lambda: None)

    def __call__(self, step: int, numbers: dict) -> None:
        self._log(step, numbers)


def _open_tracker(name: str, tensorboard_dir, run_name: str, project: str) -> _Sink:
    """One metrics sink: ``(step, {name: number}) -> None`` with a ``close()``."""
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(tensorboard_dir or "tensorboard"))

        def log(step, numbers):
            for k, v in numbers.items():
                writer.add_scalar(k, v, step)

        return _Sink(log, lambda: (writer.flush(), writer.close()))
    if name == "wandb":
        import wandb

        run = wandb.init(project=project, name=run_name, reinit=True)
        return _Sink(lambda step, numbers: run.log(numbers, step=step), run.finish)
    if name == "mlflow":
        import mlflow

        mlflow.set_experiment(project)
        active = mlflow.start_run(run_name=run_name)
        return _Sink(lambda step, numbers: mlflow.log_metrics(numbers, step=step),
                     lambda: mlflow.end_run() if mlflow.active_run() is active else None)
    if name == "trackio":
        import trackio

        trackio.init(project=project, name=run_name)
        return _Sink(lambda step, numbers: trackio.log(numbers, step=step), trackio.finish)
    raise ValueError(f"unknown tracker {name!r}; use tensorboard, wandb, mlflow or trackio")


def _fused_ok(params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel (one pass over each tensor instead of a dozen elementwise ops;
    the default of HF's Trainer too) runs on CPU and CUDA for float parameters; it needs all
    of them on one device type."""
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(
        p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) for p in params)


def _schedule(cfg: OptimConfig, total_steps: int):
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Engine:
    """Owns the optimiser and scheduler of one stage.

    Args:
        params: parameters or param-group dicts (as for ``torch.optim.AdamW``).
        cfg: learning rate, schedule, clipping.
        total_steps: optimiser steps planned (for the schedule).
        max_bad_steps: raise :class:`NonFiniteError` after this many non-finite steps in a row
            (default: ``cfg.max_nonfinite_steps``).
        name: the stage, in messages.
    """

    def __init__(self, params: Iterable, cfg: OptimConfig, total_steps: int, *, max_bad_steps: int | None = None,
                 name: str = "training"):
        params = list(params)
        if params and isinstance(params[0], dict):
            groups = params
        else:
            groups = [{"params": [p for p in params if p.requires_grad]}]
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("no trainable parameters")
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                           fused=_fused_ok(self.params) or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(cfg, max(1, total_steps)))
        self.total_steps = total_steps
        self.step_count = 0
        self.bad_steps_in_row = 0
        self.skipped_steps = 0
        self.calls = 0  # step() calls, skipped ones included
        self.max_bad_steps = max_bad_steps or getattr(cfg, "max_nonfinite_steps", 5)
        self.name = name

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step_count": self.step_count, "bad_steps_in_row": self.bad_steps_in_row,
                "skipped_steps": self.skipped_steps, "calls": self.calls}

    def load_state_dict(self, state: dict, *, config_wins: bool = False) -> None:
        """Restore a saved optimiser, schedule and counters. ``config_wins``: a resume under
        changed settings (``checkpoint.resume: force``) keeps the moments and the step count
        but takes the learning rate, betas, weight decay and schedule from this run's config,
        and starts the count of non-finite steps afresh."""
        wanted = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        base_lrs = list(self.scheduler.base_lrs)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if config_wins:
            for group, mine in zip(self.optimizer.param_groups, wanted):
                group.update({k: mine[k] for k in ("betas", "weight_decay", "initial_lr") if k in mine})
            self.scheduler.base_lrs = base_lrs
            self.scheduler.lr_lambdas = [_schedule(self.cfg, max(1, self.total_steps))] * len(base_lrs)
            for group, base, fn in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * fn(self.scheduler.last_epoch)
        self.step_count = int(state["step_count"])
        self.bad_steps_in_row = 0 if config_wins else int(state["bad_steps_in_row"])
        self.skipped_steps = int(state["skipped_steps"])
        self.calls = int(state.get("calls", self.step_count + self.skipped_steps))

    def step(self, loss: float | torch.Tensor | None = None) -> dict:
        """Clip, check, step the optimiser and scheduler, zero the gradients.

        Under data parallel the gradients are summed over processes first, and ``loss`` must
        be the global batch's (the same on every process), so all skip or step together.

        Returns ``{"grad_norm", "lr", "skipped"}``. A step whose ``loss`` (when given) or
        gradient is not finite is skipped (gradients dropped, weights and optimiser state
        untouched), counted and reported; :class:`NonFiniteError` after
        ``max_bad_steps`` of them in a row.
        """
        self.calls += 1
        # data parallel: sum the processes' gradients (each normalised by global counts), so
        # every process clips and steps on the same global-batch gradient
        from tether import distributed

        distributed.sync_gradients(self.params)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.tensor(0.0)
        norm_value = float(norm)
        loss_value = float(loss) if loss is not None else 0.0
        lr = self.lr
        if not (math.isfinite(norm_value) and math.isfinite(loss_value)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps_in_row += 1
            self.skipped_steps += 1
            what = "loss" if not math.isfinite(loss_value) else "gradient"
            if self.bad_steps_in_row >= self.max_bad_steps:
                raise NonFiniteError(
                    f"{self.name}: {self.bad_steps_in_row} optimiser steps in a row had a non-finite loss or "
                    f"gradient (the last: loss {loss_value}, gradient norm {norm_value}); stopping. Lower the "
                    "learning rate, or check the data for empty or huge inputs"
                )
            _warn_skip(f"{self.name}: optimiser step {self.calls} skipped, non-finite {what} (loss {loss_value}, "
                       f"gradient norm {norm_value}); {self.bad_steps_in_row} in a row, the stage stops at "
                       f"{self.max_bad_steps}")
            return {"grad_norm": norm_value, "lr": lr, "skipped": 1}
        self.bad_steps_in_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return {"grad_norm": norm_value, "lr": lr, "skipped": 0}


def _warn_skip(msg: str) -> None:
    import logging

    logging.getLogger("tether").warning(msg)
    from tether.console import warn

    warn(msg)
