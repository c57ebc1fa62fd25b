"""Watching for reward hacking while a policy is optimised.

Every few steps a :class:`Monitor` samples the policy on a fixed set of validation prompts
(never trained on, never used by the final evaluation) with a fixed seed, and measures:

- ``monitor/proxy``: the reward being optimised (the reward model, an uncertainty-penalised
  ensemble, a reward spec; DPO: its implicit reward β·Σ(log π − log π_ref));
- ``monitor/gold`` (when the task has a gold score), ``monitor/judge`` (a configured reward
  spec, e.g. a checker or a held-out judge function), ``monitor/heldout_rm`` (a second
  reward model), ``monitor/ensemble_std`` (disagreement of the reward-model ensemble);
- ``monitor/kl`` to the reference, ``monitor/entropy`` per token, ``monitor/length``;
- diversity and degeneration: ``monitor/distinct1``, ``monitor/distinct2`` (unique n-grams
  over all n-grams of the samples), ``monitor/repeat_rate`` (share of a response's 3-grams
  already seen earlier in it); ``monitor/refusal_rate`` and ``monitor/flattery_rate``
  (share of responses containing a configured phrase).

:func:`detect_overoptimisation` reads the history of those checks and raises alarms: the
proxy rose while the held-out signal (gold, else the judge, else the held-out RM) fell
below its best by more than a tolerance and more than ``z`` paired standard errors, for
``patience`` checks in a row; or length, diversity, repetition or ensemble disagreement
drifted past set bounds. The monitor keeps the policy's weights at its best held-out check
so that the best checkpoint can be saved beside the last one, and can stop training at the
first alarm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from tether.config import MonitorConfig

__all__ = [
    "Monitor",
    "Alarm",
    "detect_overoptimisation",
    "distinct_n",
    "repeat_rate",
    "phrase_rate",
    "text_stats",
    "heldout_key",
    "paired_stderr",
]


# --------------------------------------------------------------------------- text statistics

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams across ``texts`` (Li et al. 2016); 0 when there are none."""
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeat_rate(texts: list[str], n: int = 3) -> float:
    """Mean over responses of the share of its n-grams that already occurred earlier in the
    same response (0 for a response without repeats; responses shorter than n count 0)."""
    rates = []
    for t in texts:
        grams = _ngrams(_tokens(t), n)
        if not grams:
            rates.append(0.0)
            continue
        seen, repeats = set(), 0
        for g in grams:
            repeats += g in seen
            seen.add(g)
        rates.append(repeats / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def phrase_rate(texts: list[str], phrases: list[str]) -> float:
    """Share of ``texts`` that contain at least one of ``phrases`` (case-insensitive)."""
    if not texts or not phrases:
        return 0.0
    low = [p.lower() for p in phrases]
    return sum(any(p in t.lower() for p in low) for t in texts) / len(texts)


def text_stats(texts: list[str], refusal: list[str], flattery: list[str]) -> dict[str, float]:
    return {
        "distinct1": distinct_n(texts, 1),
        "distinct2": distinct_n(texts, 2),
        "repeat_rate": repeat_rate(texts, 3),
        "refusal_rate": phrase_rate(texts, refusal),
        "flattery_rate": phrase_rate(texts, flattery),
    }


def paired_stderr(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a − b) for paired values (0 with fewer than two pairs)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    if n < 2:
        return 0.0
    m = sum(d) / n
    return math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n)


# --------------------------------------------------------------------------- the detector


@dataclass
class Alarm:
    step: int
    kind: str  # proxy_up_heldout_down | length_drift | diversity_drop | repetition | disagreement
    message: str

    def to_dict(self) -> dict:
        return {"step": self.step, "kind": self.kind, "message": self.message}


def heldout_key(row: dict) -> str | None:
    """Which held-out signal a check row carries, in order of trust: gold, judge, held-out RM."""
    for key in ("gold", "judge", "heldout_rm"):
        if row.get(f"monitor/{key}") is not None:
            return key
    return None


def detect_overoptimisation(history: list[dict], cfg: MonitorConfig) -> list[Alarm]:
    """Alarms raised by a history of monitor checks (oldest first), at most one per kind,
    each at the first check where it holds.

    Each row holds ``step``, ``monitor/proxy``, optionally ``monitor/<heldout>`` with its
    per-prompt values under ``per_prompt`` (for paired standard errors), and the drift
    signals ``monitor/length``, ``monitor/distinct2``, ``monitor/repeat_rate``,
    ``monitor/ensemble_std``. The first row is the baseline the drift bounds compare with.
    """
    alarms: dict[str, Alarm] = {}
    if not history:
        return []
    key = heldout_key(history[0])
    base = history[0]
    best = 0
    run = 0
    for t, row in enumerate(history):
        step = int(row["step"])
        # proxy up, held-out down
        if key is not None and row.get(f"monitor/{key}") is not None:
            h = row[f"monitor/{key}"]
            if t and h > history[best][f"monitor/{key}"]:
                best = t
            if t != best:
                ref = history[best]
                drop = ref[f"monitor/{key}"] - h
                se = 0.0
                pa, pb = ref.get("per_prompt"), row.get("per_prompt")
                if pa and pb and len(pa) == len(pb):
                    se = paired_stderr(pa, pb)
                proxy_up = row.get("monitor/proxy") is not None and ref.get("monitor/proxy") is not None and \
                    row["monitor/proxy"] > ref["monitor/proxy"]
                if proxy_up and drop > max(cfg.tolerance, cfg.z * se):
                    run += 1
                else:
                    run = 0
                if run >= cfg.patience and "proxy_up_heldout_down" not in alarms:
                    alarms["proxy_up_heldout_down"] = Alarm(step, "proxy_up_heldout_down", (
                        f"reward hacking: the proxy reward rose from {ref['monitor/proxy']:.3f} to "
                        f"{row['monitor/proxy']:.3f} since step {ref['step']} while held-out {key} fell from "
                        f"{ref[f'monitor/{key}']:.3f} to {h:.3f} (drop {drop:.3f} > max(tolerance "
                        f"{cfg.tolerance}, {cfg.z}×s.e. {se:.3f})) for {run} checks in a row"))
            else:
                run = 0
        # drifts against the first check
        if t == 0:
            continue
        L0, L = base.get("monitor/length"), row.get("monitor/length")
        if L0 and L is not None and "length_drift" not in alarms and not \
                cfg.min_length_ratio <= L / L0 <= cfg.max_length_ratio:
            alarms["length_drift"] = Alarm(step, "length_drift", (
                f"length drift: mean response length {L:.1f} tokens vs {L0:.1f} at the start "
                f"(ratio {L / L0:.2f} outside [{cfg.min_length_ratio}, {cfg.max_length_ratio}])"))
        D0, D = base.get("monitor/distinct2"), row.get("monitor/distinct2")
        if D0 and D is not None and "diversity_drop" not in alarms and D / D0 < cfg.min_diversity_ratio:
            alarms["diversity_drop"] = Alarm(step, "diversity_drop", (
                f"diversity collapse: distinct-2 {D:.3f} vs {D0:.3f} at the start "
                f"(ratio {D / D0:.2f} < {cfg.min_diversity_ratio})"))
        R = row.get("monitor/repeat_rate")
        if R is not None and "repetition" not in alarms and R > cfg.max_repeat_rate and \
                R > base.get("monitor/repeat_rate", 0.0):
            alarms["repetition"] = Alarm(step, "repetition", (
                f"repetition: {R:.2f} of the responses' 3-grams repeat earlier ones "
                f"(bound {cfg.max_repeat_rate}; {base.get('monitor/repeat_rate', 0.0):.2f} at the start)"))
        S0, S = base.get("monitor/ensemble_std"), row.get("monitor/ensemble_std")
        if S0 and S is not None and "disagreement" not in alarms and S / S0 > cfg.max_disagreement_ratio:
            alarms["disagreement"] = Alarm(step, "disagreement", (
                f"reward-model ensemble disagreement {S:.3f} vs {S0:.3f} at the start "
                f"(ratio {S / S0:.2f} > {cfg.max_disagreement_ratio}): the policy is leaving the RM's data"))
    return sorted(alarms.values(), key=lambda a: a.step)


# --------------------------------------------------------------------------- the monitor

ScoreFn = Callable[..., object]  # (rollout, group) -> [B] scores (tensor or list)
FORWARD_BATCH = 16  # rows per forward pass of a check (each returns its full [rows, T, vocab] logits)


@dataclass
class Monitor:
    """Periodic held-out checks during one policy stage.

    Args:
        cfg: the run's ``monitor`` section.
        policy: the model being optimised (a peft model under LoRA).
        reference: the frozen reference, or None (the policy with adapters disabled).
        prompts: validation prompts (fixed for the whole stage).
        proxy_fn: the optimised reward ``(rollout, group) -> [B]``; None with
            ``implicit_beta`` set: DPO's implicit reward β·Σ(log π − log π_ref) (``implicit``
            "kl"), or SimPO/ORPO's β·mean log π ("avg_logp").
        gold_fn, judge_fn, heldout_rm_fn: ``(prompts, texts) -> [B]`` / ``(rollout) -> [B]``.
        ensemble_fn: ``(rollout) -> [B, N]`` scores of an ensemble's members.
        total_steps: the stage's planned steps (to spread ``cfg.checks`` over them).
    """

    cfg: MonitorConfig
    policy: object
    reference: object
    encoder: object
    prompts: list
    total_steps: int
    proxy_fn: ScoreFn | None = None
    gold_fn: Callable | None = None
    judge_fn: ScoreFn | None = None
    heldout_rm_fn: ScoreFn | None = None
    ensemble_fn: Callable | None = None
    implicit_beta: float | None = None
    implicit: str = "kl"  # DPO's implicit reward: β·Σ(log π − log π_ref) ("kl") or β·mean log π ("avg_logp": SimPO/ORPO)
    logger: object = None
    seed: int = 0
    name: str = "policy"
    history: list = field(default_factory=list)
    alarms: list = field(default_factory=list)
    best_state: dict | None = None
    best_step: int | None = None
    stopped_at: int | None = None
    sampler: object = None

    @property
    def every(self) -> int:
        if self.cfg.every > 0:
            return self.cfg.every
        return max(1, math.ceil(self.total_steps / max(1, self.cfg.checks)))

    def due(self, steps_done: int) -> bool:
        """Whether to check after ``steps_done`` steps (always at 0 and at the end)."""
        return steps_done == 0 or steps_done >= self.total_steps or steps_done % self.every == 0

    def _sample_model(self):
        from tether.rollout import SamplingCopy, active_autocast_dtype

        device = next(self.policy.parameters()).device
        low = active_autocast_dtype(device)
        from tether.models import is_quantized

        if self.sampler is None and (low is not None or hasattr(self.policy, "merge_and_unload")) \
                and not is_quantized(self.policy):  # a QLoRA policy samples itself
            self.sampler = SamplingCopy(self.policy, low or next(self.policy.parameters()).dtype)
        if self.sampler is not None:
            self.sampler.sync()
            return self.sampler.model
        return self.policy

    @property
    def has_reference(self) -> bool:
        """A reference to measure KL against: given, or the policy's adapters switched off."""
        return self.reference is not None or hasattr(self.policy, "disable_adapter")

    @torch.no_grad()
    def _kl_entropy(self, rollout) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Per-sample Σ_t(log π − log π_ref) [B] (None without a reference), mean per-token
        entropy [B] and mean per-token log-prob [B], in forward batches of ``FORWARD_BATCH``
        rows (each returns its full logits)."""
        from tether.models import reference_context, sequence_logprobs
        from tether.ops import entropy_from_logits
        from tether.rollout import trimmed_batch

        policy = self.policy
        device = next(policy.parameters()).device
        kl = torch.zeros(len(rollout)) if self.has_reference else None
        ent, avg_lp = torch.zeros(len(rollout)), torch.zeros(len(rollout))
        order = torch.argsort(rollout.attention_mask.sum(dim=1), stable=True)
        bs = FORWARD_BATCH
        for b in range(0, len(rollout), bs):
            rows = order[b : b + bs]
            ids, att, start, width = trimmed_batch(rollout, rows, device)
            m = rollout.response_mask[rows][:, :width].to(device).float()
            n_tok = m.sum(dim=1).clamp(min=1)
            lp, logits = sequence_logprobs(policy, ids, att, start, return_logits=True)
            e = entropy_from_logits(logits).float()
            del logits
            ent[rows] = ((e * m).sum(dim=1) / n_tok).cpu()
            avg_lp[rows] = ((lp.float() * m).sum(dim=1) / n_tok).cpu()
            if kl is not None:
                with reference_context(policy, self.reference) as ref:
                    rp = sequence_logprobs(ref, ids, att, start)
                kl[rows] = ((lp - rp).float() * m).sum(dim=1).cpu()
        return kl, ent, avg_lp

    def check(self, steps_done: int) -> bool:
        """Run one check after ``steps_done`` steps; returns True when training should stop.

        The check draws its samples from a forked RNG, so training's random stream is the
        same with or without the monitor."""
        import random

        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            try:
                return self._check(steps_done)
            finally:
                random.setstate(py_state)

    def _check(self, steps_done: int) -> bool:
        from tether.rollout import generate

        cfg = self.cfg
        was_training = self.policy.training
        self.policy.eval()
        try:
            rollout = generate(self._sample_model(), self.encoder, self.prompts, cfg.generation, seed=self.seed)
            kl, ent, avg_lp = self._kl_entropy(rollout)
        finally:
            self.policy.train(was_training)
        row: dict = {"step": steps_done}

        def mean(x) -> float:
            x = [float(v) for v in x]
            return sum(x) / len(x) if x else float("nan")

        if self.proxy_fn is not None:
            row["monitor/proxy"] = mean(_as_list(_call(self.proxy_fn, rollout)))
        elif self.implicit_beta is not None and self.implicit == "kl" and kl is not None:
            row["monitor/proxy"] = self.implicit_beta * mean(kl.tolist())
        elif self.implicit_beta is not None and self.implicit == "avg_logp":
            row["monitor/proxy"] = self.implicit_beta * mean(avg_lp.tolist())
        per_prompt = None
        if self.gold_fn is not None:
            gold = list(self.gold_fn(rollout.prompts, rollout.texts))
            row["monitor/gold"] = mean(gold)
            per_prompt = gold
        if self.judge_fn is not None:
            judge = _as_list(_call(self.judge_fn, rollout))
            row["monitor/judge"] = mean(judge)
            per_prompt = per_prompt or judge
        if self.heldout_rm_fn is not None:
            held = _as_list(_call(self.heldout_rm_fn, rollout))
            row["monitor/heldout_rm"] = mean(held)
            per_prompt = per_prompt or held
        if self.ensemble_fn is not None:
            from tether.algorithms.reward import ensemble_spread

            members = torch.as_tensor(self.ensemble_fn(rollout), dtype=torch.float32)
            if members.dim() == 2 and members.size(1) > 1:
                row["monitor/ensemble_std"] = float(ensemble_spread(members).mean())
        if kl is not None:
            row["monitor/kl"] = mean(kl.tolist())
        row["monitor/entropy"] = mean(ent.tolist())
        row["monitor/length"] = float(rollout.lengths.float().mean())
        row["monitor/ended"] = float(rollout.ended.float().mean())
        for k, v in text_stats(rollout.texts, cfg.refusal_phrases, cfg.flattery_phrases).items():
            row[f"monitor/{k}"] = v
        key = heldout_key(row)
        if key is not None:
            row["monitor/heldout"] = row[f"monitor/{key}"]
        row["per_prompt"] = per_prompt
        self.history.append(row)

        # the best weights by the held-out signal (ties keep the earlier, less optimised ones)
        if key is not None and cfg.keep_best:
            best = self.best_row()
            if best is None or best is row:
                self.best_step = steps_done
                self.best_state = {n: p.detach().to("cpu", copy=True)
                                   for n, p in self.policy.named_parameters() if p.requires_grad}
        new = [a for a in detect_overoptimisation(self.history, cfg) if a.kind not in {x.kind for x in self.alarms}]
        self.alarms.extend(new)
        row["monitor/alarm"] = float(bool(new))
        if self.logger is not None:
            self.logger.log(steps_done, {k: v for k, v in row.items() if k.startswith("monitor/")})
        from tether.console import say as _say

        for a in new:
            _say(f"[bold red]⚠ {self.name} step {a.step}: {a.message}[/bold red]")
        stop = bool(new) and cfg.early_stop and (cfg.stop_on == "any" or any(a.kind == "proxy_up_heldout_down"
                                                                               for a in self.alarms))
        if stop:
            self.stopped_at = steps_done
            _say(f"[bold red]  early stop: {self.name} stops after {steps_done} steps (monitor.early_stop)[/bold red]")
        return stop

    def best_row(self) -> dict | None:
        rows = [r for r in self.history if isinstance(r.get("monitor/heldout"), (int, float))
                and math.isfinite(r["monitor/heldout"])]
        if not rows:
            return None
        top = max(r["monitor/heldout"] for r in rows)
        return next(r for r in rows if r["monitor/heldout"] == top)

    def restore_best(self) -> None:
        """Load the best check's weights into the policy."""
        if self.best_state is not None:
            self.load_weights(self.best_state)

    def load_weights(self, state: dict) -> None:
        """Copy ``{name: tensor}`` (trainable parameters) into the policy."""
        params = dict(self.policy.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                params[n].copy_(v)

    def state_dict(self) -> dict:
        """What a resumed stage needs: the checks so far, their alarms and the best weights."""
        return {"history": list(self.history), "alarms": [a.to_dict() for a in self.alarms],
                "best_state": self.best_state, "best_step": self.best_step, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.alarms = [Alarm(**a) for a in state["alarms"]]
        self.best_state, self.best_step, self.stopped_at = state["best_state"], state["best_step"], state["stopped_at"]

    def summary(self) -> dict:
        best = self.best_row()
        last = self.history[-1] if self.history else {}
        return {
            "hacking_detected": bool(self.alarms),
            "first_alarm_step": self.alarms[0].step if self.alarms else None,
            "alarms": [a.to_dict() for a in self.alarms],
            "checks": len(self.history),
            "every": self.every,
            "heldout": heldout_key(self.history[0]) if self.history else None,
            "best_step": best["step"] if best else None,
            "best_heldout": best.get("monitor/heldout") if best else None,
            "last_step": last.get("step"),
            "last_heldout": last.get("monitor/heldout"),
            "early_stopped_at": self.stopped_at,
            "prompts": len(self.prompts),
        }


def _call(fn, rollout):
    """``fn(rollout, 1)`` when ``fn`` needs a second positional argument (the group size),
    else ``fn(rollout)``; parameters with defaults (closures' bound values) do not count."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
        n = sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                for p in params)
    except (TypeError, ValueError):
        n = 1
    return fn(rollout, 1) if n >= 2 else fn(rollout)


def _as_list(x) -> list[float]:
    if isinstance(x, torch.Tensor):
        return x.float().reshape(-1).tolist()
    return [float(v) for v in x]
