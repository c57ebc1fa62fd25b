"""The pipeline: stages in order, one folder per stage, skip what is done.

``DIR/<stage>/`` holds the stage's artifacts (an HF ``checkpoint/`` for model stages,
``config.yaml``, ``metrics.jsonl``) and, written last, ``stage.json`` with its results. A
stage with a ``stage.json`` is skipped on the next run; a stage without one (cut off) is
started again from a clean folder. ``DIR/summary.json`` is rewritten after every stage.

Stages: data → sft → prefs → rm → ppo → eval (``policy: ppo``, the default); data → sft →
prefs → dpo → eval (``policy: dpo``); data → sft → [prefs → rm →] grpo|rloo → eval (the
reward model only when ``reward`` names it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import torch
import yaml

from tether import distributed
from tether.console import say as _say
from tether.config import POLICIES, STAGES, ConfigError, RunConfig, config_to_dict
from tether.data.io import atomic_write_text, write_json, write_jsonl
from tether.data.schemas import Ranking, load_demonstrations, load_rankings
from tether.data.tokenize import Encoder
from tether.engine import MetricsLogger

log = logging.getLogger("tether")

__all__ = ["Pipeline", "run_pipeline", "STAGES", "TRAINING_STAGES"]

#: stages with optimiser steps, which save resumable checkpoints as they go (the others are
#: deterministic and start again when cut off; eval keeps each policy's finished evaluation)
TRAINING_STAGES = ("sft", "rm", "prm", "ppo", "dpo", "grpo", "rloo")
#: the config sections each training stage trains with (besides seed, model, lora, task)
STAGE_SECTIONS = {"sft": ["sft"], "rm": ["rm"], "prm": ["prm"], "ppo": ["ppo", "monitor", "rm", "prm"],
                  "dpo": ["dpo", "monitor"], "grpo": ["grpo", "monitor", "rm", "prm"],
                  "rloo": ["rloo", "monitor", "rm", "prm"]}
#: the stages whose results each training stage reads
STAGE_INPUTS = {"sft": ["data"], "rm": ["data", "sft", "prefs"], "prm": ["data", "sft"],
                "dpo": ["data", "sft", "prefs"], "ppo": ["data", "sft", "prefs", "rm", "prm"],
                "grpo": ["data", "sft", "prefs", "rm", "prm"], "rloo": ["data", "sft", "prefs", "rm", "prm"]}



def complete_sentences(text: str) -> str:
    """``text`` up to its last sentence end (. ! ? and closing quotes/brackets); '' if none."""
    import re

    ends = list(re.finditer(r"[.!?][\"'”’)\]]*(?=\s|$)", text))
    return text[: ends[-1].end()].rstrip() if ends else ""


def _rm_accuracy_on_policy(metrics: Path) -> dict | None:
    """The distribution shift the reward model meets: its pairwise accuracy against gold on
    the policy's own rollouts (samples of the same prompt whose gold differs), on the first
    rollout (the SFT policy's samples) and pooled over the second half of the steps (PPO's).
    The s.e. is binomial over pairs (pairs of one prompt share samples: a lower bound)."""
    if not metrics.is_file():
        return None
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("reward/pairs"):
            rows.append(r)
    if not rows:
        return None

    def pooled(part: list[dict]) -> dict:
        n = sum(r["reward/pairs"] for r in part)
        acc = sum(r["reward/pair_accuracy"] * r["reward/pairs"] for r in part) / n
        return {"accuracy": acc, "stderr": (acc * (1 - acc) / n) ** 0.5, "pairs": n,
                "steps": [r["step"] for r in part]}

    half = rows[len(rows) // 2:] if len(rows) > 1 else rows
    return {"sft_samples": pooled(rows[:1]), "ppo_samples": pooled(half)}


class Pipeline:
    def __init__(self, cfg: RunConfig, out_dir: str | Path | None = None):
        self.cfg = cfg
        self.dir = Path(out_dir or cfg.out or f"runs/{cfg.preset}")
        self.dir.mkdir(parents=True, exist_ok=True)
        from tether.tasks import get_task

        self.task = get_task(cfg.task.name, n_heldout=cfg.task.n_heldout)
        self._tokenizer = None
        self._rm = None  # the reward model reward_fn loaded (the monitor reads its heads)
        self._prm = None  # the process reward model a 'prm' reward loaded
        self._rm_cache = None  # (rollout, its scores): the last rollout the reward model scored
        # flywheel rounds (tether.flywheel) set these; a plain run leaves them alone
        self.sampler: str | None = None  # the checkpoint whose samples are labelled (default: SFT)
        self.start: str | None = None  # where the policy stage starts (default: SFT; the reference stays SFT)
        self.carried_labels: list[Path] = []  # earlier rounds' labels.jsonl, trained on with this round's
        self.round: int = 0  # picks this round's prompts and sampling seed
        self._checkpointer = None  # the running training stage's

    # ------------------------------------------------------------------ helpers
    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def is_done(self, stage: str) -> bool:
        if not (self.stage_dir(stage) / "stage.json").is_file():
            return False
        if stage == "eval" and self.cfg.eval_policies():
            listed = self.result("eval").get("policies", [])
            if not set(self.eval_names()) <= set(listed):  # a policy not evaluated yet
                return False
            # a policy stage that finished after the evaluation (run again) makes it stale
            done_at = (self.stage_dir("eval") / "stage.json").stat().st_mtime
            return all((self.stage_dir("eval") / f"{n}.json").is_file() for n in listed) and not any(
                (self.stage_dir(p) / "stage.json").is_file() and (self.stage_dir(p) / "stage.json").stat().st_mtime > done_at
                for p in ("sft", *POLICIES) if p in self.eval_names())
        return True

    def other_checkpoints(self) -> dict[str, str]:
        """``{"<policy>_best" or "<policy>_last": folder}`` for every finished policy stage that
        kept a second checkpoint (``eval.other_checkpoints``)."""
        out = {}
        if self.cfg.eval.other_checkpoints:
            for p in POLICIES:
                for alt in ("best", "last"):
                    if self.is_done(p) and (self.stage_dir(p) / alt / "config.json").is_file():
                        out[f"{p}_{alt}"] = str(self.stage_dir(p) / alt)
        return out

    def eval_names(self) -> list[str]:
        """What the eval stage evaluates: ``eval.policies`` (or base, sft and the policy) and
        those policies' other kept checkpoints."""
        wanted = list(self.cfg.eval_policies())
        return wanted + [n for n in self.other_checkpoints() if n.split("_")[0] in wanted]

    def result(self, stage: str) -> dict:
        path = self.stage_dir(stage) / "stage.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def checkpoint(self, stage: str) -> str:
        path = self.stage_dir(stage) / "checkpoint"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no checkpoint; run the '{stage}' stage first")
        return str(path)

    def encoder(self) -> Encoder:
        if self._tokenizer is None:
            from tether.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.model.name)
        return Encoder(self._tokenizer, self.cfg.model.max_length, self.cfg.model.max_prompt_length)

    def generate(self, policy, prompts: list, gen, seed: int, desc: str):
        """Sample one response per prompt with a progress bar (responses/s and ETA)."""
        from tether.engine import progress_bar
        from tether.rollout import generate

        with progress_bar(len(prompts), desc, unit="sample") as bar:
            return generate(policy, self.encoder(), prompts, gen, seed=seed, progress=bar.update)

    def frozen_policy(self, path: str):
        """A policy only sampled from and scored: stored in the autocast dtype when one is
        active (bf16 weights decode faster than float32 ones cast at every step)."""
        from tether.models import load_policy
        from tether.rollout import active_autocast_dtype

        model = load_policy(path, self.cfg.model, trainable=False)
        low = active_autocast_dtype(next(model.parameters()).device)
        return model.to(low) if low is not None else model

    def logger(self, folder: Path) -> MetricsLogger:
        """The stage's metrics.jsonl, plus the run's trackers (TensorBoard: DIR/tensorboard/<stage>).
        Under data parallel only the first process writes (the others log to memory)."""
        from tether import distributed

        if not distributed.is_main():
            return MetricsLogger(None)
        return MetricsLogger(folder / "metrics.jsonl", trackers=self.cfg.trackers,
                             tensorboard_dir=self.dir / "tensorboard" / folder.name,
                             run_name=f"{self.dir.name}/{folder.name}")

    def validation_prompts(self) -> list:
        """The monitor's prompts: the last ``monitor.n_prompts`` of the task's training prompts
        (at most a quarter). No stage trains on them — not SFT's demonstrations, not the
        preference data, not the policy stages — and the final evaluation uses the held-out
        prompts. They are held back whether the monitor is on or not, so switching it off
        changes nothing else."""
        train = self.task.train_prompts()
        n = min(self.cfg.monitor.n_prompts, len(train) // 4)
        return train[len(train) - n :]

    def train_prompts(self) -> list:
        """The prompts every stage trains on: the task's, less the validation prompts."""
        train = self.task.train_prompts()
        return train[: len(train) - len(self.validation_prompts())]

    def make_monitor(self, name: str, policy, reference, total_steps: int, logger, *, proxy_fn=None,
                     implicit_beta: float | None = None, implicit: str = "kl"):
        """The monitor of a policy stage (None when ``monitor.enabled`` is off, and on every
        process but the first under data parallel: it alone samples and scores the validation
        prompts, and its stop decision is broadcast)."""
        from tether import distributed

        if not self.cfg.monitor.enabled or not distributed.is_main():
            return None
        from tether.monitor import Monitor
        from tether.rewards import parse_reward_spec
        from tether.tasks.base import Task

        m = self.cfg.monitor
        judge_fn = self.score_spec(m.judge, m.generation.batch_size) if m.judge else None
        # gold is a held-out signal only when the policy does not optimise it
        optimised = {n for _, n in parse_reward_spec(self.cfg.reward)} if name != "dpo" else set()
        has_gold = type(self.task).gold is not Task.gold
        gold_fn = self.task.gold_batch if has_gold and "gold" not in optimised else None
        if gold_fn is None and judge_fn is None and not m.heldout_rm:
            _say(f"[yellow]warning: {name}: the monitor has no held-out signal (gold is "
                 f"{'optimised' if has_gold else 'not defined by this task'}; set monitor.judge or "
                 f"monitor.heldout_rm), so it can only watch for drift[/yellow]")
        heldout_rm_fn = None
        if m.heldout_rm:
            from tether.algorithms.reward import ensemble_reward, score_rollout
            from tether.models import check_same_tokenizer, load_scalar_model

            # it scores the policy's token ids: a model on another tokenizer would read nonsense
            check_same_tokenizer(self.encoder().tokenizer, m.heldout_rm, "monitor.heldout_rm")
            held = load_scalar_model(m.heldout_rm, self.cfg.model, pad_token_id=self.encoder().pad_id, num_labels=None)
            held.requires_grad_(False)

            def heldout_rm_fn(rollout):
                return ensemble_reward(score_rollout(held, rollout, m.generation.batch_size))
        ensemble_fn = None
        if self._rm is not None and getattr(self._rm.config, "num_labels", 1) > 1:
            ensemble_fn = lambda rollout: self.rm_heads(rollout, m.generation.batch_size)  # noqa: E731
        return Monitor(m, policy, reference, self.encoder(), self.validation_prompts(), total_steps,
                       proxy_fn=proxy_fn, gold_fn=gold_fn, judge_fn=judge_fn, heldout_rm_fn=heldout_rm_fn,
                       ensemble_fn=ensemble_fn, implicit_beta=implicit_beta, implicit=implicit, logger=logger,
                       seed=self.cfg.seed * 1000 + 50, name=name)

    def save_policy(self, folder: Path, policy, monitor) -> dict:
        """Save the stage's policy as ``checkpoint/`` and, when the monitor's best check is not
        the last, the other one beside it (``best/`` or, with ``monitor.select: best``,
        ``last/``); returns the monitor's summary (written to ``monitor.json`` too)."""
        from tether import distributed
        from tether.models import save_checkpoint

        tok = self.encoder().tokenizer
        if not distributed.is_main():  # data parallel: every process holds the same weights
            return {}
        if monitor is None:
            save_checkpoint(policy, tok, folder / "checkpoint")
            return {}
        summary = monitor.summary()
        differs = monitor.best_state is not None and summary["best_step"] != summary["last_step"]
        if differs and summary["best_step"] == 0 and self.cfg.monitor.select == "last":
            differs = False  # the best check is the starting policy, which is saved already (the reference)
            summary["other_checkpoint"] = "the starting policy (best at step 0)"
        if differs and self.cfg.monitor.select == "best":  # in memory afterwards: the best weights
            save_checkpoint(policy, tok, folder / "last")
            monitor.restore_best()
            save_checkpoint(policy, tok, folder / "checkpoint")
            summary.update(checkpoint="best", other_checkpoint=str(folder / "last"))
        else:  # in memory afterwards: the last weights
            save_checkpoint(policy, tok, folder / "checkpoint")
            summary["checkpoint"] = "last"
            if differs:
                last = {n: p.detach().to("cpu", copy=True) for n, p in policy.named_parameters() if p.requires_grad}
                monitor.restore_best()
                save_checkpoint(policy, tok, folder / "best")
                monitor.load_weights(last)
                summary["other_checkpoint"] = str(folder / "best")
        write_json(folder / "monitor.json", {**summary, "history": [
            {k: v for k, v in r.items() if k != "per_prompt"} for r in monitor.history]})
        if summary["hacking_detected"]:
            _say(f"[bold red]⚠ {folder.name}: over-optimisation alarms from step {summary['first_alarm_step']} "
                 f"({', '.join(a['kind'] for a in summary['alarms'])}); best held-out "
                 f"{summary['heldout']} at step {summary['best_step']}[/bold red]")
        return summary

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self, stage: str) -> str:
        """What a stage's checkpoints are valid for: the config sections the stage trains
        with, the results of the stages it reads (their ``stage.json``), and a flywheel
        round's starting points. Settings that cannot change its training (``stages``,
        ``eval``, the report, trackers, threads, the checkpoint settings) are left out, so a
        run cut off under ``--stages [data,sft]`` resumes under a plain ``tether run``."""
        from tether.checkpoint import fingerprint

        conf = config_to_dict(self.cfg)
        sections = ["seed", "model", "lora", "task", *STAGE_SECTIONS.get(stage, [stage])]
        if stage in ("ppo", "grpo", "rloo"):
            sections.append("reward")
        before = {}
        for s in STAGE_INPUTS.get(stage, []):
            path = self.stage_dir(s) / "stage.json"
            if path.is_file():
                before[s] = hashlib.sha256(path.read_bytes()).hexdigest()
        return fingerprint(stage, {k: conf.get(k) for k in sections}, before,
                           [self.sampler, self.start, [str(p) for p in self.carried_labels], self.round])

    def make_checkpointer(self, stage: str):
        from tether.checkpoint import Checkpointer

        return Checkpointer.from_config(self.stage_dir(stage) / "checkpoints", self.cfg.checkpoint, stage=stage,
                                        fingerprint=self.fingerprint(stage))

    def _resumable(self, stage: str) -> int | None:
        """The step of the checkpoint a cut-off training stage resumes from, or None. Under
        ``checkpoint.resume: auto``, checkpoints saved under other settings are moved aside
        (``DIR/.stale/``), not deleted."""
        c = self.cfg.checkpoint
        root = self.stage_dir(stage) / "checkpoints"
        if stage not in TRAINING_STAGES or not root.is_dir():
            return None
        if c.resume == "never" or not (c.every or c.every_minutes):
            return None
        from tether.checkpoint import latest_valid

        found = latest_valid(root, None if c.resume == "force" else self.fingerprint(stage))
        if found is not None:
            return int(found[1]["step"])
        if latest_valid(root, quarantine=False) is not None:  # intact, but of other settings
            stale = self.dir / ".stale" / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
            stale.parent.mkdir(parents=True, exist_ok=True)
            root.rename(stale)
            _say(f"[yellow]note: {stage}: its checkpoints were saved under other settings or other results of "
                 f"the stages it reads, so the stage starts again; they are kept in {stale} "
                 f"(--checkpoint.resume force goes on from them instead)[/yellow]")
        return None

    def _seed(self, offset: int) -> int:
        seed = self.cfg.seed * 1000 + offset
        random.seed(seed)
        torch.manual_seed(seed)
        return seed

    # ------------------------------------------------------------------ running
    def run(self, stages: list[str] | None = None) -> dict:
        """Run the stages in order, skipping finished ones.

        Under a launcher (``tether run --nproc N``, ``torchrun``, ``accelerate launch``) every
        process runs the training stages data-parallel (:mod:`tether.distributed`); the
        first process alone runs the others (data, preference sampling, evaluation), writes
        every file, and the rest wait for it.
        """
        from tether import distributed

        distributed.init_from_env()
        main = distributed.is_main()
        if not main:
            os.environ["TETHER_QUIET"] = "1"
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        stages = stages or self.cfg.stage_list()
        if distributed.world_size() > 1:
            # a zoo model is built (or unpacked) once, by the first process: transformers saves
            # on the first process only once a process group is up
            from tether.zoo import ZOO, resolve_model

            if main and self.cfg.model.name in ZOO:
                resolve_model(self.cfg.model.name)
            distributed.barrier()
        if main:
            write_json(self.dir / "config.json", config_to_dict(self.cfg))
            (self.dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        for stage in stages:
            distributed.barrier()
            if self.is_done(stage):
                _say(f"[dim]• {stage}: done already ({self.stage_dir(stage)}), skipped[/dim]")
                if main and not self.cfg.checkpoint.keep_after:  # a kill between its stage.json and the clean-up
                    shutil.rmtree(self.stage_dir(stage) / "checkpoints", ignore_errors=True)
                continue
            folder = self.stage_dir(stage)
            resume = distributed.broadcast_object(self._resumable(stage) if main else None)
            if main:
                if folder.exists() and stage != "eval" and resume is None:  # eval keeps the evaluations it can reuse
                    shutil.rmtree(folder)  # a stage cut off earlier, with no checkpoint to go on from, starts again
                if resume is None:
                    shutil.rmtree(self.dir / "tensorboard" / stage, ignore_errors=True)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "stage.json").unlink(missing_ok=True)
                atomic_write_text(folder / "config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
            distributed.barrier()
            if stage not in TRAINING_STAGES and not main:
                continue  # the first process runs it; the next barrier waits for it
            parallel = f" on {distributed.world_size()} processes" if stage in TRAINING_STAGES and \
                distributed.world_size() > 1 else ""
            _say(f"[bold]• {stage}[/bold]{parallel}" +
                 (f" (resuming: checkpoint of step {resume})" if resume is not None else ""))
            t0 = time.time()
            from tether.checkpoint import _fault
            from tether.errors import CheckpointError, NonFiniteError
            from tether.models import autocast_context

            self._checkpointer = self.make_checkpointer(stage) if stage in TRAINING_STAGES else None
            try:
                with autocast_context(self.cfg.model.autocast, self.device):
                    result = getattr(self, f"stage_{stage}")(folder)
            except (NonFiniteError, CheckpointError) as exc:
                from tether.checkpoint import latest_valid

                found = latest_valid(folder / "checkpoints", quarantine=False)
                where = (f"its last good checkpoint, {found[0]} (step {found[1]['step']}), is kept: the same "
                         "command repeats the same steps from it, and with changed settings (a lower learning "
                         "rate, say) add --checkpoint.resume force to go on from it" if found
                         else "it had saved no checkpoint yet")
                raise type(exc)(f"{stage + ': ' if isinstance(exc, CheckpointError) else ''}{exc}; {where}") from None
            _fault(stage, "end", 1)
            if not main:
                continue
            result["seconds"] = round(time.time() - t0, 2)
            if parallel:
                result["processes"] = distributed.world_size()
            write_json(folder / "stage.json", result)
            if self._checkpointer is not None:
                self._checkpointer.finish(keep=self.cfg.checkpoint.keep_after)
            self.write_summary()
        distributed.barrier()
        if not main:
            return {}
        summary = self.write_summary()
        if self.cfg.report:
            from tether.report import build_report

            try:
                summary["report"] = str(build_report(self.dir))
            except Exception as exc:  # the run's results stand without their report
                log.warning("could not write the report: %s", exc)
                _say(f"[yellow]warning: could not write {self.dir / 'report.html'}: {exc}; "
                     f"`tether report {self.dir}` retries[/yellow]")
        return summary

    @property
    def device(self) -> torch.device:
        """Where this process's models go (``model.device``; ``auto``: its GPU, else the CPU)."""
        from tether.distributed import device_for_rank

        return device_for_rank(self.cfg.model.device)

    # ------------------------------------------------------------------ stages
    def stage_data(self, folder: Path) -> dict:
        cfg = self.cfg
        extra: dict = {}
        if cfg.sft.demos:
            demos = [{"prompt": d.prompt, "response": d.response} for d in load_demonstrations(cfg.sft.demos)]
            source = cfg.sft.demos
        elif getattr(self.task, "demo_source", "task") == "best_of_n":
            demos, extra = self._best_of_n_demos(folder)
            source = (f"best-of-{cfg.sft.best_of_n} samples of {cfg.model.name}, kept when task:{self.task.name} accepts "
                      f"them{' or after its repair' if cfg.sft.repair and hasattr(self.task, 'repair') else ''}")
        else:
            held = set(self.validation_prompts())
            demos = [d for d in self.task.demonstrations(cfg.task.n_demos, seed=self._seed(1)) if d["prompt"] not in held]
            source = f"task:{self.task.name}"
        if not demos:
            raise RuntimeError(f"no SFT demonstrations: none of the base model's samples was accepted by "
                               f"task '{self.task.name}'; raise sft.best_of_n or task.n_demos")
        write_jsonl(folder / "demos.jsonl", demos)
        write_jsonl(folder / "prompts_train.jsonl", [{"prompt": p} for p in self.train_prompts()])
        write_jsonl(folder / "prompts_validation.jsonl", [{"prompt": p} for p in self.validation_prompts()])
        write_jsonl(folder / "prompts_heldout.jsonl", [{"prompt": p} for p in self.task.heldout_prompts()])
        return {
            **extra,
            "demos": len(demos),
            "demos_source": source,
            "train_prompts": len(self.train_prompts()),
            "validation_prompts": len(self.validation_prompts()),
            "heldout_prompts": len(self.task.heldout_prompts()),
        }

    def _best_of_n_demos(self, folder: Path) -> tuple[list[dict], dict]:
        """Rejection sampling: ``sft.best_of_n`` samples of the base model per training
        prompt; the best-scoring sample the task accepts (every instruction holds) becomes
        the demonstration. A sample cut off by ``max_new_tokens`` is considered up to its
        last complete sentence (a demonstration always ends where the model should stop).
        Prompts with no accepted sample give none."""

        cfg = self.cfg
        n = cfg.sft.best_of_n
        seed = self._seed(1)
        train = self.train_prompts()
        prompts = random.Random(seed).sample(train, min(cfg.task.n_demos, len(train)))
        policy = self.frozen_policy(cfg.model.name)
        rollout = self.generate(policy, [q for q in prompts for _ in range(n)], cfg.sft.generation, seed,
                                f"best-of-{n} demos")
        repeated = [q for q in prompts for _ in range(n)]
        gold = self.task.gold_batch(repeated, rollout.texts)
        texts = list(rollout.texts)
        for i, ended in enumerate(rollout.ended.tolist()):
            if not ended:  # cut off by max_new_tokens: keep its complete sentences, if any
                texts[i] = complete_sentences(texts[i])
        ok = [bool(texts[i]) and self.task.accepts_demo(repeated[i], texts[i]) for i in range(len(repeated))]
        raw_gold = gold  # the base model's own samples, for the record
        gold = [self.task.gold(repeated[i], texts[i]) if texts[i] != rollout.texts[i] else gold[i]
                for i in range(len(repeated))]
        repair = getattr(self.task, "repair", None) if cfg.sft.repair else None
        demos, repaired = [], {}
        for j, q in enumerate(prompts):
            block = range(j * n, (j + 1) * n)
            idx = [i for i in block if ok[i]]
            if idx:
                best = max(idx, key=lambda i: gold[i])
                demos.append({"prompt": q, "response": texts[best]})
            elif repair is not None:  # edit the best samples until every instruction holds
                for i in sorted(block, key=lambda i: -gold[i]):
                    fixed = repair(q, texts[i]) if texts[i] else None
                    if fixed is not None:
                        repaired[i] = fixed
                        demos.append({"prompt": q, "response": fixed})
                        break
        write_jsonl(folder / "base_samples.jsonl", [
            {"prompt": repeated[i], "response": rollout.texts[i], "ended": bool(rollout.ended[i]),
             "kept": texts[i], "gold": gold[i], "accepted": ok[i], "repaired": repaired.get(i)}
            for i in range(len(repeated))
        ])
        return demos, {
            "demo_prompts_tried": len(prompts),
            "demo_samples": len(repeated),
            "demos_sampled": len(demos) - len(repaired),
            "demos_repaired": len(repaired),
            "base_sample_gold_mean": sum(raw_gold) / len(raw_gold),
            "base_sample_accept_rate": sum(ok) / len(ok),
        }

    def stage_sft(self, folder: Path) -> dict:
        from tether.algorithms.sft import train_sft
        from tether.models import load_policy, save_checkpoint

        cfg = self.cfg
        seed = self._seed(2)
        demos = load_demonstrations(self.stage_dir("data") / "demos.jsonl")
        encoder = self.encoder()
        model = load_policy(cfg.model.name, cfg.model, cfg.lora)
        logger = self.logger(folder)
        result = train_sft(model, encoder, demos, cfg.sft, seed=seed, logger=logger, checkpointer=self._checkpointer)
        logger.close()
        if not distributed.is_main():
            return result
        save_checkpoint(model, encoder.tokenizer, folder / "checkpoint")
        if (msg := encoder.stats.summary()):
            _say(f"[yellow]warning: {msg}[/yellow]")
        result["truncation"] = {"prompts_cut": encoder.stats.prompts_cut, "responses_cut": encoder.stats.responses_cut}
        return result

    def stage_prefs(self, folder: Path) -> dict:
        """Preferences from ``feedback``: simulated labelers, an AI judge, or a file. Items
        ranked by several labelers are aggregated as ``prefs.aggregate`` says; the rankings
        that train are ``rankings.jsonl`` (every labeler's own in ``labels.jsonl``)."""
        p = self.cfg.prefs
        if self.cfg.feedback == "file":
            return self._prefs_from_file(folder, p.path)
        from tether.algorithms.reward import pairwise_accuracy
        from tether.feedback.simulated import (
            SimulatedLabeler,
            calibrate_temperature,
            percent_agreement_pairs,
        )

        judge = None
        if self.cfg.feedback == "judge":  # built first: a bad judge setting fails before the sampling
            from tether.feedback.judge import make_judge

            try:
                judge = make_judge(self.cfg.judge, self.cfg.model.name)
            except ValueError as exc:
                raise ConfigError(f"judge: {exc}") from None
        seed = self._seed(3) + 7919 * self.round
        rng = random.Random(seed)
        policy = self.frozen_policy(self.sampler or self.checkpoint("sft"))
        train = self.train_prompts()
        if self.round:  # a flywheel round: the next slice of the prompts, shuffled once for all rounds
            order = list(range(len(train)))
            random.Random(self.cfg.seed * 1000 + 3).shuffle(order)
            first = (self.round - 1) * p.n_prompts
            prompts = [train[order[(first + i) % len(train)]] for i in range(p.n_prompts)]
            if self.round * p.n_prompts > len(train):
                _say(f"[yellow]note: round {self.round} re-uses prompts: {len(train)} training prompts, "
                     f"{p.n_prompts} per round (the samples are new)[/yellow]")
        else:
            prompts = [train[i % len(train)] for i in rng.sample(range(max(len(train), p.n_prompts)), p.n_prompts)]
        heldout = self.task.heldout_prompts()[: p.heldout_prompts]

        def sample_groups(plist: list, s: int, desc: str) -> list[dict]:
            rollout = self.generate(policy, [q for q in plist for _ in range(p.k)], p.generation, s, desc)
            groups = []
            for i, q in enumerate(plist):
                texts = rollout.texts[i * p.k : (i + 1) * p.k]
                groups.append({"prompt": q, "responses": texts, "gold": self.task.gold_batch([q] * p.k, texts)})
            return groups

        groups = sample_groups(prompts, seed, f"K={p.k} samples")
        heldout_groups = sample_groups(heldout, seed + 1, f"K={p.k} held-out")
        policy = None  # the judge (or the labelers) need the memory more
        write_jsonl(folder / "heldout.jsonl", heldout_groups)
        write_jsonl(folder / "samples.jsonl", groups)  # what was labelled, with gold (`tether judge` reads it)
        gold_all = [x for g in groups for x in g["gold"]]
        common = {"rankings": None, "prompts": len(groups), "k": p.k, "heldout_groups": len(heldout_groups),
                  "sample_gold_mean": sum(gold_all) / len(gold_all)}
        if self.cfg.feedback == "judge":
            rankings, extra = self._judge_rankings(folder, groups, judge)
            return {**common, **self._write_rankings(folder, rankings), **extra}
        if self.cfg.feedback == "app":
            rankings, extra = self._app_rankings(groups)
            return {**common, **self._write_rankings(folder, rankings), **extra}

        gaps = [abs(g["gold"][i] - g["gold"][j]) for g in groups for i in range(p.k) for j in range(i + 1, p.k)]
        tau, expected = calibrate_temperature(gaps, p.target_agreement)
        if expected < p.target_agreement - 0.02:
            _say(f"[yellow]warning: labelers can agree on at most {expected:.2f} of pairs here "
                 f"(ties in gold); target was {p.target_agreement}[/yellow]")
        labelers = [SimulatedLabeler(f"labeler-{i}", tau, seed * 7919 + i) for i in range(p.n_labelers)]

        rankings, agree, compared = [], 0, 0
        n_overlap = int(round(p.overlap * len(groups)))
        for gi, g in enumerate(groups):
            raters = rng.sample(labelers, p.labelers_per_item) if gi < n_overlap else [rng.choice(labelers)]
            orders = []
            for lab in raters:
                order = lab.rank(g["gold"])
                orders.append(order)
                rankings.append({"prompt": g["prompt"], "responses": g["responses"], "ranking": order,
                                 "rater": lab.rater_id, "item": gi})
            for a in range(len(orders)):
                for b in range(a + 1, len(orders)):
                    x, n = percent_agreement_pairs(orders[a], orders[b])
                    agree += x
                    compared += n
        rng.shuffle(rankings)
        # the simulated labelers' own accuracy on the held-out pairs, beside the RM's later
        lab_agree = lab_total = 0
        judge = labelers[0]
        for g in heldout_groups:
            order = judge.rank(g["gold"])
            rank_score = [0.0] * p.k
            for r, item in enumerate(order):
                rank_score[item] = -r
            x, n = pairwise_accuracy(rank_score, g["gold"])
            lab_agree += x
            lab_total += n
        from tether.data.schemas import parse_ranking

        written = self._write_rankings(folder, [parse_ranking(r, allow_empty_responses=True) for r in rankings])
        return {
            **common,
            "source": "simulated",
            **written,
            "labelers": p.n_labelers,
            "overlap_items": n_overlap,
            "labeler_tau": tau,
            "labeler_agreement_expected": expected,
            "labeler_agreement": agree / compared if compared else None,
            "labeler_agreement_pairs": compared,
            "labeler_heldout_accuracy": lab_agree / lab_total if lab_total else None,
        }

    def _write_rankings(self, folder: Path, rankings: list[Ranking]) -> dict:
        """Write every labeler's rankings (``labels.jsonl``), the rankings that train
        (``rankings.jsonl``: aggregated per ``prefs.aggregate``) and their pairs
        (``pairs.jsonl``); returns counts and agreement statistics."""
        from tether.data.schemas import ranking_record, rankings_to_pairs
        from tether.feedback.aggregate import aggregate_rankings, agreement_stats

        write_jsonl(folder / "labels.jsonl", [ranking_record(r) for r in rankings])
        carried = [r for path in self.carried_labels for r in load_rankings(path, allow_empty_responses=True)]
        rankings = carried + list(rankings)
        train = aggregate_rankings(rankings, self.cfg.prefs.aggregate)
        write_jsonl(folder / "rankings.jsonl", [ranking_record(r) for r in train])
        pairs = rankings_to_pairs(train)
        write_jsonl(folder / "pairs.jsonl", pairs)
        stats = agreement_stats(rankings)
        return {"labels": len(rankings) - len(carried), "labels_carried": len(carried), "rankings": len(train),
                "pairs": len(pairs),
                "aggregate": self.cfg.prefs.aggregate,
                "agreement": {k: v for k, v in stats.items() if k != "raters"},
                "rater_quality": stats["raters"]}

    def _app_rankings(self, groups: list[dict]) -> tuple[list[Ranking], dict]:
        """People label: the samples become items of the labeling app (``prefs.app_db``) and
        the stage waits until ``prefs.app_quota`` labels of them are in. A rerun finds the
        items it imported (tagged with the run folder and round) and goes on waiting."""
        from tether.engine import progress_bar
        from tether.labeling.store import LabelStore

        p = self.cfg.prefs
        store = LabelStore(p.app_db)
        tag = f"{self.dir.resolve()}#round{self.round}"
        ids = store.item_ids(tag) or store.add_items(groups, source=tag)
        quota = p.app_quota or len(ids) * store.overlap
        _say(f"waiting for {quota} labels of {len(ids)} items in {p.app_db} (`tether label serve --db {p.app_db}`)")
        start, done = time.time(), store.label_count(tag)
        with progress_bar(quota, "labels from the app", unit="label") as bar:
            bar.update(min(done, quota))
            while done < quota:
                if p.app_timeout and time.time() - start > p.app_timeout:
                    raise RuntimeError(f"{p.app_db}: {done} of {quota} labels after {p.app_timeout:.0f} s; run again "
                                       f"to keep waiting (the items stay), or lower prefs.app_quota")
                time.sleep(min(5.0, max(0.2, p.app_timeout / 20 if p.app_timeout else 5.0)))
                now = store.label_count(tag)
                bar.update(min(now, quota) - min(done, quota))
                done = now
        wanted = set(ids)
        rankings = [r for r in store.rankings() if r.meta.get("item") in wanted]
        return rankings, {"source": f"app ({p.app_db})", "app_items": len(ids), "app_quota": quota,
                          "app_wait_seconds": round(time.time() - start, 1)}

    def _judge_rankings(self, folder: Path, groups: list[dict], judge) -> tuple[list[Ranking], dict]:
        """RLAIF: the AI judge ranks each group (every pair asked in both orders); its
        accuracy against gold and its position bias are measured on the same pairs."""
        from tether.engine import progress_bar
        from tether.feedback.judge import Verdict, accuracy_against_gold, position_bias

        n_calls = sum(len(g["responses"]) * (len(g["responses"]) - 1) for g in groups)
        with progress_bar(n_calls, f"judge {judge.name}", unit="call") as bar:
            ranked = judge.rank([(g["prompt"], g["responses"]) for g in groups], progress=bar.update)
        rankings, verdicts, scored = [], [], []
        for gi, (g, res) in enumerate(zip(groups, ranked)):
            rankings.append(Ranking(g["prompt"], g["responses"], res["order"], judge.name, {"item": gi}))
            for i, j, pij, pab, pba, valid in res["pairs"]:
                verdicts.append({"item": gi, "i": i, "j": j, "p": pij, "p_ab": pab, "p_ba": pba, "valid": valid,
                                 "gold_i": g["gold"][i], "gold_j": g["gold"][j]})
                scored.append(Verdict(pab, pba, valid))
        write_jsonl(folder / "verdicts.jsonl", verdicts)
        acc = accuracy_against_gold([(v["gold_i"], v["gold_j"], v["p_ab"], v["p_ba"]) for v in verdicts])
        bias = position_bias(scored)
        extra = {"source": f"judge ({judge.name})", "judge": judge.name, "judge_accuracy": acc,
                 "judge_position_bias": bias, "judge_unreadable": sum(not v["valid"] for v in verdicts)}
        client = getattr(judge, "client", None)
        if client is not None:
            extra["judge_requests"] = dict(client.stats)
            client.close()
        _say(f"judge {judge.name}: accuracy vs gold {acc['swapped']:.3f} on {acc['pairs']} pairs "
             f"(first order alone {acc['first_order']:.3f}); first-slot rate {bias['first_slot_rate']:.3f}, "
             f"consistent under swap {bias['consistency']:.3f}" if acc["pairs"] else f"judge {judge.name}: done")
        return rankings, extra

    def _prefs_from_file(self, folder: Path, path: str) -> dict:
        """Rankings from a file or dataset; a tenth of its items (all of an item's rankings
        together, so no item is on both sides) are held out for the reward model's accuracy."""
        from tether.feedback.aggregate import item_key

        rankings = load_rankings(path)
        keys = sorted({item_key(r) for r in rankings})
        random.Random(self._seed(3)).shuffle(keys)
        n_held = max(1, len(keys) // 10) if len(keys) >= 10 else 0
        held_keys = set(keys[:n_held])
        held = [r for r in rankings if item_key(r) in held_keys]
        train = [r for r in rankings if item_key(r) not in held_keys]
        random.Random(self._seed(3)).shuffle(train)

        # held-out rankings: their label order plays the part of gold (higher = better; ties
        # equal; a soft label below ½ reverses the order, at ½ it is a tie)
        def gold_of(r: Ranking) -> list[float]:
            tiers = r.tiers or list(range(len(r.order)))
            sign = 0.0 if r.soft_label == 0.5 else (1.0 if r.soft_label > 0.5 else -1.0)
            return [-sign * tiers[r.order.index(i)] for i in range(len(r.responses))]

        write_jsonl(folder / "heldout.jsonl", [{"prompt": r.prompt, "responses": r.responses, "gold": gold_of(r)}
                                               for r in held])
        return {"source": path, **self._write_rankings(folder, train), "heldout_groups": len(held)}

    def stage_rm(self, folder: Path) -> dict:
        from tether.algorithms.reward import pairwise_accuracy, score_groups, train_reward
        from tether.data.io import read_jsonl
        from tether.models import load_scalar_model, save_checkpoint

        cfg = self.cfg
        seed = self._seed(4)
        encoder = self.encoder()
        rankings = load_rankings(self.stage_dir("prefs") / "rankings.jsonl", allow_empty_responses=True)
        frozen = cfg.rm.trunk == "frozen"
        model = load_scalar_model(self.checkpoint("sft"), cfg.model, None if frozen else cfg.lora,
                                  pad_token_id=encoder.pad_id, num_labels=cfg.rm.ensemble)
        logger = self.logger(folder)
        if frozen:  # the SFT backbone as it is, linear heads fitted on its states (every process alike)
            from tether.algorithms.reward import fit_reward_model

            model.requires_grad_(False)
            groups = [rec for _, rec in read_jsonl(self.stage_dir("prefs") / "heldout.jsonl")]
            result = fit_reward_model(model, encoder, rankings, cfg.rm, seed=seed, heldout=groups, logger=logger)
            logger.close()
            if distributed.is_main():
                save_checkpoint(model, encoder.tokenizer, folder / "checkpoint")
            return result
        result = train_reward(model, encoder, rankings, cfg.rm, seed=seed, logger=logger,
                              checkpointer=self._checkpointer)
        if not distributed.is_main():  # the first process evaluates and saves
            return result
        # held-out pairwise accuracy against the gold order
        groups = [rec for _, rec in read_jsonl(self.stage_dir("prefs") / "heldout.jsonl")]
        agree = total = 0
        if groups:
            heads = score_groups(model, encoder, [(g["prompt"], g["responses"]) for g in groups])
            heads = heads.unsqueeze(-1) if heads.dim() == 1 else heads
            per_head = []
            for h in range(-1, heads.size(1)):  # -1: the ensemble's mean
                scores = (heads.mean(dim=1) if h < 0 else heads[:, h]).tolist()
                agree = total = pos = 0
                for g in groups:
                    k = len(g["responses"])
                    x, n = pairwise_accuracy(scores[pos : pos + k], g["gold"])
                    agree, total, pos = agree + x, total + n, pos + k
                per_head.append(agree / total if total else None)
            if heads.size(1) > 1:
                result["heldout_accuracy_per_head"] = per_head[1:]
        result["heldout_accuracy"] = per_head[0] if groups else None
        result["heldout_pairs"] = total
        logger.log(result["steps"], {"rm/heldout_accuracy": result["heldout_accuracy"]})
        logger.close()
        save_checkpoint(model, encoder.tokenizer, folder / "checkpoint")
        return result

    def prm_separator(self) -> str:
        return self.cfg.prm.separator or getattr(self.task, "separator", "\n")

    def stage_prm(self, folder: Path) -> dict:
        """A process reward model (and, to compare, an outcome reward model) on the SFT
        policy's solutions, labelled step by step by the task's checker (or read from
        ``prm.path``); then best-of-N on held-out prompts with each."""
        import dataclasses

        from tether.algorithms.prm import outcome_examples, train_prm
        from tether.data.schemas import StepExample, load_step_examples, step_example_record
        from tether.models import load_scalar_model, save_checkpoint

        cfg, pc = self.cfg, self.cfg.prm
        seed = self._seed(10)
        sep = self.prm_separator()
        pcfg = dataclasses.replace(pc, separator=sep)
        encoder = self.encoder()
        checks = hasattr(self.task, "step_labels")
        outcomes = None
        if pc.path:
            examples = load_step_examples(pc.path, separator=sep)
            source = pc.path
        else:
            if not checks:
                raise ConfigError(f"prm: task '{self.task.name}' has no step checker; give prm.path (JSONL of "
                                  "{prompt, steps, labels})")
            policy = self.frozen_policy(self.checkpoint("sft"))
            rng = random.Random(seed)
            train = self.train_prompts()
            prompts = rng.sample(train, min(pc.n_prompts, len(train)))
            gen = pc.generation if pc.sample_temperature is None else \
                dataclasses.replace(pc.generation, temperature=pc.sample_temperature)
            rollout = self.generate(policy, [p for p in prompts for _ in range(pc.samples_per_prompt)],
                                    gen, seed, "PRM samples")
            examples, outcomes = [], []
            for p, text, gold in zip(rollout.prompts, rollout.texts, self.task.gold_batch(rollout.prompts, rollout.texts)):
                steps = self.task.split_steps(text)
                if steps:  # an empty answer has no step to label
                    examples.append(StepExample(p, steps, [float(v) for v in self.task.step_labels(p, steps)], sep))
                    outcomes.append(float(gold))
            if distributed.is_main():
                write_jsonl(folder / "steps.jsonl", [step_example_record(ex, gold=g) for ex, g in zip(examples, outcomes)])
            source = f"{len(rollout)} samples of the SFT policy, labelled by task:{self.task.name}"
        labelled = [v for ex in examples for v in ex.labels]
        result = {"source": source, "solutions": len(examples), "steps_labelled": len(labelled),
                  "share_right": sum(v > 0.5 for v in labelled) / max(len(labelled), 1)}
        if outcomes is not None:
            result["share_final_right"] = sum(outcomes) / max(len(outcomes), 1)
        model = load_scalar_model(self.checkpoint("sft"), cfg.model, cfg.lora, pad_token_id=encoder.pad_id)
        logger = self.logger(folder)
        result["prm"] = train_prm(model, encoder, examples, pcfg, seed=seed, logger=logger,
                                  checkpointer=self._checkpointer)
        orm = None
        if pc.outcome_baseline and outcomes is not None:
            orm = load_scalar_model(self.checkpoint("sft"), cfg.model, cfg.lora, pad_token_id=encoder.pad_id)
            result["orm"] = train_prm(orm, encoder, outcome_examples(examples, outcomes), pcfg, seed=seed,
                                      logger=logger, name="orm")
        if not distributed.is_main():
            return result
        save_checkpoint(model, encoder.tokenizer, folder / "checkpoint")
        if orm is not None:
            save_checkpoint(orm, encoder.tokenizer, folder / "orm")
        if checks and pc.best_of:
            result["heldout"] = self._prm_best_of_n(folder, model, orm, encoder, seed + 1)
            h = result["heldout"]
            logger.log(result["prm"]["steps"], {"prm/heldout_step_accuracy": h["step_accuracy"],
                                                **{f"best_of_{pc.best_of}/{k}": v["accuracy"]
                                                   for k, v in h["best_of_n"].items()}})
        logger.close()
        return result

    def _prm_best_of_n(self, folder: Path, prm, orm, encoder, seed: int) -> dict:
        """Held-out step accuracy of the PRM, and best-of-N final-answer accuracy when the
        PRM (min and product of its steps), the ORM, chance or an oracle picks."""
        from tether.algorithms.prm import aggregate_steps, best_of_n, score_steps
        from tether.evaluate import mean_stderr

        pc, sep, n = self.cfg.prm, self.prm_separator(), self.cfg.prm.best_of
        prompts = self.task.heldout_prompts()[: pc.heldout_prompts]
        policy = self.frozen_policy(self.checkpoint("sft"))
        rollout = self.generate(policy, [p for p in prompts for _ in range(n)], pc.generation, seed, "best-of-N samples")
        gold = torch.tensor(self.task.gold_batch(rollout.prompts, rollout.texts)).view(len(prompts), n)
        steps = [self.task.split_steps(t) for t in rollout.texts]
        probs = score_steps(prm, encoder, rollout.prompts, steps, sep)
        right = total = 0
        for p, s, pr in zip(rollout.prompts, steps, probs):
            labels = self.task.step_labels(p, s)[: len(pr)]
            right += sum(int((q > 0.5) == bool(v)) for q, v in zip(pr.tolist(), labels))
            total += len(labels)
        share_right = sum(sum(self.task.step_labels(p, s)) for p, s in zip(rollout.prompts, steps)) / max(
            sum(len(s) for s in steps), 1)
        picks = {f"prm_{how}": torch.tensor([aggregate_steps(pr, how) for pr in probs]).view(len(prompts), n)
                 for how in ("min", "prod")}
        if orm is not None:
            whole = [[sep.join(s)] if s else [] for s in steps]
            outcome = score_steps(orm, encoder, rollout.prompts, [w or [""] for w in whole], sep)
            picks["orm"] = torch.tensor([float(o[-1]) if w and o.numel() else 0.0
                                         for o, w in zip(outcome, whole)]).view(len(prompts), n)
        results = {k: best_of_n(v, gold) for k, v in picks.items()}
        chance = gold.double().mean(dim=1).tolist()
        oracle = gold.double().amax(dim=1).tolist()
        for name, values in (("chance", chance), ("oracle", oracle)):
            mean, se = mean_stderr(values)
            results[name] = {"accuracy": mean, "stderr": se, "prompts": len(prompts), "per_prompt": values}
        out = {"prompts": len(prompts), "n": n, "step_accuracy": right / max(total, 1), "steps": total,
               "share_right_steps": share_right}
        if "orm" in results:
            diff = [a - b for a, b in zip(results[f"prm_{pc.aggregate}"]["per_prompt"], results["orm"]["per_prompt"])]
            mean, se = mean_stderr(diff)
            out["prm_minus_orm"] = {"mean": mean, "stderr": se, "aggregate": pc.aggregate}
        write_jsonl(folder / "best_of_n.jsonl", [
            {"prompt": p, "response": t, "gold": float(g), **{k: float(v.view(-1)[i]) for k, v in picks.items()}}
            for i, (p, t, g) in enumerate(zip(rollout.prompts, rollout.texts, gold.view(-1).tolist()))])
        out["best_of_n"] = {k: {kk: vv for kk, vv in v.items() if kk != "per_prompt"} for k, v in results.items()}
        return out

    def stage_ppo(self, folder: Path) -> dict:
        from tether.algorithms.ppo import train_ppo
        from tether.models import frozen_copy, load_policy, load_scalar_model

        cfg = self.cfg
        seed = self._seed(5)
        encoder = self.encoder()
        policy = load_policy(self.start or self.checkpoint("sft"), cfg.model, cfg.lora)
        if self.start:  # a flywheel round: the policy goes on from the last round, tethered to SFT
            # (under LoRA too: the adapters disabled would be the last round's merged policy)
            reference = load_policy(self.checkpoint("sft"), cfg.model, trainable=False)
        elif cfg.lora.enabled:
            reference = None  # the adapters disabled: the SFT policy, no second copy
        else:
            reference = frozen_copy(policy)
        if cfg.ppo.critic == "head":
            from tether.algorithms.ppo import ValueHead

            value_model = ValueHead(policy.config.hidden_size).to(next(policy.parameters()).device)
        else:
            value_from = self.checkpoint("rm") if cfg.ppo.value_init == "rm" else self.checkpoint("sft")
            value_model = load_scalar_model(value_from, cfg.model, cfg.lora, pad_token_id=encoder.pad_id)

        step_fn = self.step_reward_fn(cfg.ppo.micro_batch_size)
        score_fn = self.reward_fn(cfg.ppo.micro_batch_size, dense=step_fn is not None)
        logger = self.logger(folder)
        monitor = self.make_monitor("ppo", policy, reference, cfg.ppo.steps, logger,
                                    proxy_fn=self.reward_fn(cfg.ppo.micro_batch_size))
        result = train_ppo(policy, value_model, reference, encoder, self.train_prompts(), score_fn, cfg.ppo,
                           seed=seed, gold_fn=self.task.gold_batch, logger=logger, monitor=monitor,
                           checkpointer=self._checkpointer, step_reward_fn=step_fn)
        logger.close()
        result["monitor"] = self.save_policy(folder, policy, monitor)
        return result

    def reward_fn(self, chunk: int, dense: bool = False):
        """The run's ``reward`` spec as one function ``(rollout, group) -> [B]`` (``dense``:
        without its 'prm' term, which :meth:`step_reward_fn` gives per step)."""
        return self.score_spec(self.cfg.reward, chunk, skip_prm=dense)

    def _prm_model(self):
        if self._prm is None:
            from tether.models import load_scalar_model

            self._prm = load_scalar_model(self.checkpoint("prm"), self.cfg.model, pad_token_id=self.encoder().pad_id)
            self._prm.requires_grad_(False)
        return self._prm

    def _split_steps(self):
        sep = self.prm_separator()
        return getattr(self.task, "split_steps", None) or (lambda text: [x for x in text.split(sep) if x.strip()])

    def step_reward_fn(self, chunk: int):
        """The 'prm' term of the reward spec as dense per-step rewards ``(rollout) -> (rewards
        [B, R], step mask [B, R], probabilities)``, weighted; None when the spec has none or
        ``prm.dense`` is off."""
        from tether.algorithms.prm import rollout_step_rewards
        from tether.rewards import parse_reward_spec

        weight = sum(w for w, name in parse_reward_spec(self.cfg.reward) if name == "prm")
        if not weight or not self.cfg.prm.dense:
            return None
        split, sep = self._split_steps(), self.prm_separator()

        def fn(rollout):
            rewards, mask, probs = rollout_step_rewards(self._prm_model(), self.encoder(), rollout, split, sep, chunk)
            return weight * rewards, mask, probs

        return fn

    def score_spec(self, spec: str, chunk: int, skip_prm: bool = False):
        """A reward spec ('rm', 'prm', 'gold', 'module:function', weighted sums) as one function
        ``(rollout, group) -> [B]``. 'rm' is the run's reward model; an ensemble gives the
        mean of its heads minus ``rm.uncertainty_penalty`` × their std. 'prm' is the run's
        process reward model's score of the whole solution (``prm.aggregate`` of its steps)."""
        from tether.rewards import combine_rewards, load_callable, parse_reward_spec

        terms = []
        for weight, name in parse_reward_spec(spec):
            if name == "prm":
                if skip_prm:
                    continue
                from tether.algorithms.prm import aggregate_steps, score_steps

                def prm_score(rollout, group):
                    steps = [self._split_steps()(t) for t in rollout.texts]
                    probs = score_steps(self._prm_model(), self.encoder(), rollout.prompts, steps,
                                        self.prm_separator(), chunk)
                    return [aggregate_steps(p, self.cfg.prm.aggregate) for p in probs]

                terms.append((weight, prm_score))
            elif name == "rm":
                from tether.algorithms.reward import ensemble_reward
                from tether.models import load_scalar_model

                if self._rm is None:
                    self._rm = load_scalar_model(self.checkpoint("rm"), self.cfg.model, pad_token_id=self.encoder().pad_id,
                                                 num_labels=None)
                    self._rm.requires_grad_(False)
                lam = self.cfg.rm.uncertainty_penalty
                terms.append((weight, lambda rollout, group: ensemble_reward(self.rm_heads(rollout, chunk, group), lam)))
            elif name == "gold":
                terms.append((weight, lambda rollout, group: self.task.gold_batch(rollout.prompts, rollout.texts)))
            else:
                fn = load_callable(name)
                terms.append((weight, lambda rollout, group, fn=fn: list(fn(rollout.prompts, rollout.texts))))
        return combine_rewards(terms)

    def rm_heads(self, rollout, chunk: int, group: int = 1):
        """The reward model's scores of a rollout, [B] or [B, H] for H heads; the last
        rollout's are kept, so the monitor's proxy and ensemble read one forward pass."""
        from tether.algorithms.reward import score_rollout

        if self._rm_cache is not None and self._rm_cache[0] is rollout:
            return self._rm_cache[1]
        scores = score_rollout(self._rm, rollout, chunk, group)
        self._rm_cache = (rollout, scores)
        return scores

    def stage_dpo(self, folder: Path) -> dict:
        from tether.algorithms.dpo import REFERENCE_FREE, cache_key, ranking_logps, reference_logps, train_dpo
        from tether.algorithms.reward import collate_rankings, pairwise_accuracy
        from tether.data.io import read_jsonl
        from tether.models import load_policy, reference_context
        from tether.zoo import tether_home

        cfg, d = self.cfg, self.cfg.dpo
        seed = self._seed(7)
        encoder = self.encoder()
        rankings = load_rankings(self.stage_dir("prefs") / "rankings.jsonl", allow_empty_responses=True)
        sft = self.checkpoint("sft")
        policy = load_policy(sft, cfg.model, cfg.lora)
        from tether.models import frozen_copy

        reference = None if cfg.lora.enabled else frozen_copy(policy)
        ref_logps, cache_hit = None, False
        if d.loss not in REFERENCE_FREE:
            cache_file = None
            if d.cache_reference:
                from tether.rollout import active_autocast_dtype

                precision = str(active_autocast_dtype(next(policy.parameters()).device) or next(policy.parameters()).dtype)
                key = cache_key(sft, encoder, rankings, extra=precision)  # bf16 and fp32 log-probs differ
                cache_file = tether_home() / "cache" / "reference_logps" / f"{key}.pt"
                cache_hit = cache_file.exists()
            ref_logps = reference_logps(policy, reference, encoder, rankings, batch_size=d.optim.micro_batch_size,
                                        share_prompt=d.share_prompt, cache_file=cache_file)
        logger = self.logger(folder)
        from tether.engine import plan_steps

        total = plan_steps(len(rankings), d.optim.batch_size, d.epochs, d.max_steps)
        monitor = self.make_monitor("dpo", policy, reference, total, logger, implicit_beta=d.beta,
                                    implicit="avg_logp" if d.loss in REFERENCE_FREE else "kl")
        result = train_dpo(policy, reference, encoder, rankings, d, seed=seed, ref_logps=ref_logps, logger=logger,
                           monitor=monitor, checkpointer=self._checkpointer)
        result["reference_cache_hit"] = cache_hit
        if not distributed.is_main():  # the first process evaluates and saves
            return result
        # the checkpoint's weights (monitor.select: last or best) stay in memory for what follows
        result["monitor"] = self.save_policy(folder, policy, monitor)
        # held-out: does the implicit reward β·(log π − log π_ref) order the held-out
        # responses as gold does? (for SimPO/ORPO: the length-normalised log-prob)
        groups = [rec for _, rec in read_jsonl(self.stage_dir("prefs") / "heldout.jsonl")]
        if groups:
            held = [Ranking(prompt=g["prompt"], responses=g["responses"], order=list(range(len(g["responses"]))))
                    for g in groups]
            policy.eval()
            agree = total = 0
            with torch.no_grad():
                for b in range(0, len(held), d.optim.micro_batch_size):
                    batch = collate_rankings(encoder, held[b : b + d.optim.micro_batch_size], d.share_prompt, split=True)
                    lp, lengths = ranking_logps(policy, batch)
                    if d.loss in REFERENCE_FREE:
                        score = lp / lengths.clamp(min=1)
                    else:
                        with reference_context(policy, reference) as ref:
                            score = lp - ranking_logps(ref, batch)[0]
                    for g, row in zip(groups[b : b + d.optim.micro_batch_size], score.tolist()):
                        x, n = pairwise_accuracy(row[: len(g["responses"])], g["gold"])
                        agree, total = agree + x, total + n
            result["heldout_accuracy"] = agree / total if total else None
            result["heldout_pairs"] = total
            logger.log(result["steps"], {"dpo/heldout_accuracy": result["heldout_accuracy"]})
        if d.kl_prompts:
            result.update(self._kl_estimate(policy, reference, d.kl_prompts, d.generation, seed))
            logger.log(result["steps"], {"kl/heldout": result["kl_heldout"]})
        logger.close()
        return result

    def _kl_estimate(self, policy, reference, n: int, gen, seed: int) -> dict:
        """KL(policy ‖ reference) per sequence on ``n`` held-out prompts, from the policy's samples."""
        from tether.evaluate import mean_stderr, rollout_kl

        policy.eval()
        rollout = self.generate(policy, self.task.heldout_prompts()[:n], gen, seed, "KL samples")
        kls = rollout_kl(policy, reference, rollout, gen.batch_size)
        mean, se = mean_stderr(kls.tolist())
        return {"kl_heldout": mean, "kl_heldout_stderr": se, "kl_heldout_prompts": n}

    def _stage_group_rl(self, folder: Path, name: str) -> dict:
        from tether.algorithms.grpo import train_grpo
        from tether.models import frozen_copy, load_policy

        cfg = self.cfg
        gcfg = getattr(cfg, name)
        seed = self._seed(8 if name == "grpo" else 9)
        if cfg.ray.enabled:
            return self._stage_group_rl_ray(folder, name, gcfg, seed)
        encoder = self.encoder()
        policy = load_policy(self.checkpoint("sft"), cfg.model, cfg.lora)
        reference = frozen_copy(policy) if gcfg.beta > 0 and not cfg.lora.enabled else None
        logger = self.logger(folder)
        step_fn = self.step_reward_fn(gcfg.micro_batch_size)
        reward_fn = self.reward_fn(gcfg.micro_batch_size, dense=step_fn is not None)
        monitor = self.make_monitor(name, policy, reference, gcfg.steps, logger,
                                    proxy_fn=self.reward_fn(gcfg.micro_batch_size))
        result = train_grpo(policy, reference, encoder, self.train_prompts(), reward_fn, gcfg, seed=seed,
                            gold_fn=self.task.gold_batch, logger=logger, name=name, monitor=monitor,
                            checkpointer=self._checkpointer, step_reward_fn=step_fn)
        result["reward"] = cfg.reward
        logger.close()
        result["monitor"] = self.save_policy(folder, policy, monitor)
        return result

    def _stage_group_rl_ray(self, folder: Path, name: str, gcfg, seed: int) -> dict:
        """GRPO/RLOO with the trainer and rollout workers placed by Ray (:mod:`tether.scale`).
        The reward runs on the rollout workers: 'rm' (the run's reward model, loaded there)
        or 'gold' (the task's checker). The monitor is not run on Ray workers."""
        from tether.rewards import parse_reward_spec
        from tether.scale import ModelReward, Placement, TaskReward, train_grpo_ray

        cfg = self.cfg
        if distributed.world_size() > 1:
            raise ConfigError("ray.enabled: Ray places its own workers; run it without --nproc/torchrun")
        terms = parse_reward_spec(cfg.reward)
        if len(terms) != 1 or terms[0][0] != 1 or terms[0][1] not in ("rm", "gold"):
            raise ConfigError(f"ray.enabled: reward {cfg.reward!r} is not supported on Ray workers; use 'rm' or 'gold'")
        if terms[0][1] == "rm":
            reward = ModelReward(self.checkpoint("rm"), cfg.model, gcfg.micro_batch_size,
                                 penalty=cfg.rm.uncertainty_penalty)
        else:
            reward = TaskReward(cfg.task.name, cfg.task.n_heldout)
        if cfg.monitor.enabled:
            _say(f"[yellow]note: {name}: the monitor does not run on Ray workers; the eval stage still "
                 "measures the policy[/yellow]")
        r = cfg.ray
        placement = Placement(rollout_workers=r.rollout_workers, rollout_cpus=r.rollout_cpus,
                              rollout_gpus=r.rollout_gpus, trainer_cpus=r.trainer_cpus, trainer_gpus=r.trainer_gpus,
                              strategy=r.strategy, address=r.address)
        logger = self.logger(folder)
        result = train_grpo_ray(self.checkpoint("sft"), cfg.model, self.train_prompts(), reward, gcfg,
                                lora=cfg.lora, placement=placement, seed=seed, gold_fn=self.task.gold_batch,
                                logger=logger, save_to=str(folder / "checkpoint"), name=name)
        logger.close()
        result.pop("weights", None)
        result.update(reward=cfg.reward, planned_steps=gcfg.steps, advantage=gcfg.advantage, monitor={})
        return result

    def stage_grpo(self, folder: Path) -> dict:
        return self._stage_group_rl(folder, "grpo")

    def stage_rloo(self, folder: Path) -> dict:
        return self._stage_group_rl(folder, "rloo")

    def stage_eval(self, folder: Path) -> dict:
        from tether.evaluate import evaluate_policy

        cfg = self.cfg
        encoder = self.encoder()
        prompts = self.task.heldout_prompts()
        paths = {"base": cfg.model.name}
        refs = {"sft": "base", **{p: "sft" for p in POLICIES}}
        stage_of = {p: p for p in ("sft", *POLICIES)}  # the stage whose output a name is
        # a policy stage's other checkpoint (the monitor's best/, or last/ under select: best)
        for name, path in self.other_checkpoints().items():
            paths[name], refs[name], stage_of[name] = path, "sft", name.split("_")[0]
        results = {}

        def key(name: str) -> dict:
            """What an evaluation depends on: reused while this stays the same."""
            path = paths.get(name) or self.checkpoint(name)
            weights = Path(path) / "config.json"
            try:  # a run folder copied elsewhere keeps its evaluations
                path = str(Path(path).resolve().relative_to(self.dir.resolve()))
            except ValueError:
                pass
            settings = {k: v for k, v in config_to_dict(cfg.eval).items() if k not in ("policies", "other_checkpoints")}
            return json.loads(json.dumps({"model": path, "mtime": weights.stat().st_mtime_ns if weights.is_file() else None,
                                          "eval": settings, "seed": cfg.seed, "task": config_to_dict(cfg.task)}))

        def reusable(name: str) -> dict | None:
            """An earlier evaluation of ``name`` whose checkpoint and settings are unchanged."""
            file = folder / f"{name}.json"
            if not file.is_file() or not (name == "base" or self.is_done(stage_of.get(name, name))):
                return None
            res = json.loads(file.read_text())
            return res if res.get("key") == key(name) else None

        wanted = self.eval_names()
        order = ["base", "sft", *[n for p in POLICIES for n in (p, f"{p}_best", f"{p}_last")]]
        for name in order:  # earlier policies stay listed beside the new ones
            if name not in wanted and (name in paths or name in stage_of) and (res := reusable(name)) is not None:
                results[name] = res
        for name in wanted:
            if (res := reusable(name)) is not None:
                _say(f"  {name}: evaluated already with the same checkpoint and settings, reused")
                results[name] = res
                continue
            path = paths.get(name) or self.checkpoint(name)
            policy = self.frozen_policy(path)
            ref_name = refs.get(name)
            reference = None
            if ref_name is not None and stage_of.get(name, name) in cfg.eval.kl:
                reference = self.frozen_policy(paths.get(ref_name) or self.checkpoint(ref_name))
            _say(f"  evaluating {name} on {min(len(prompts), cfg.eval.n_prompts)} held-out prompts")
            from tether.engine import progress_bar

            n = min(len(prompts), cfg.eval.n_prompts) * cfg.eval.samples_per_prompt
            with progress_bar(n, f"eval {name}", unit="sample") as bar:
                res = evaluate_policy(policy, encoder, self.task, prompts, cfg.eval, reference=reference,
                                      seed=self._seed(6), progress=bar.update)
            if reference is not None:
                res["reference"] = ref_name
            res["key"] = key(name)
            results[name] = res
            write_json(folder / f"{name}.json", res)
        return {"policies": [n for n in order if n in results]}

    # ------------------------------------------------------------------ summary
    def write_summary(self) -> dict:
        summary: dict = {"run_dir": str(self.dir), "preset": self.cfg.preset, "task": self.cfg.task.name,
                         "model": self.cfg.model.name, "stages": {}}
        for stage in STAGES:
            if self.is_done(stage):
                summary["stages"][stage] = {"seconds": self.result(stage).get("seconds")}
        if self.is_done("prefs"):
            prefs = self.result("prefs")
            summary["preferences"] = {k: v for k, v in prefs.items() if k != "seconds"}
        if self.is_done("rm"):
            rm = self.result("rm")
            summary["reward_model"] = {
                "heldout_accuracy": rm.get("heldout_accuracy"),
                "heldout_pairs": rm.get("heldout_pairs"),
                "labeler_heldout_accuracy": self.result("prefs").get("labeler_heldout_accuracy"),
                "final_loss": rm.get("final_loss"),
                "trunk": rm.get("trunk", "tuned"),
                "rankings": self.result("prefs").get("rankings"),
            }
            if rm.get("learning_curve"):
                summary["reward_model"]["learning_curve"] = rm["learning_curve"]
            if rm.get("head_fit"):
                summary["reward_model"]["head_fit"] = {k: rm["head_fit"].get(k) for k in ("l2", "steps", "folds", "cv_loss")}
        if self.is_done("ppo"):
            ppo = self.result("ppo")
            summary["ppo"] = {"final_kl_coef": ppo.get("final_kl_coef"), "last": ppo.get("last")}
            shift = _rm_accuracy_on_policy(self.stage_dir("ppo") / "metrics.jsonl")
            if shift and "reward_model" in summary:
                summary["reward_model"]["on_policy_accuracy"] = shift
        if self.is_done("dpo"):
            dpo = self.result("dpo")
            summary["dpo"] = {k: dpo.get(k) for k in ("loss", "beta", "final_loss", "heldout_accuracy", "heldout_pairs",
                                                      "kl_heldout", "kl_heldout_stderr", "last")}
        for name in ("grpo", "rloo"):
            if self.is_done(name):
                res = self.result(name)
                summary[name] = {"reward": res.get("reward"), "first": res.get("first"), "last": res.get("last")}
        monitors = {name: self.result(name)["monitor"] for name in POLICIES
                    if self.is_done(name) and self.result(name).get("monitor")}
        if monitors:
            summary["monitor"] = {name: {k: m.get(k) for k in ("hacking_detected", "first_alarm_step", "alarms",
                                                               "heldout", "best_step", "best_heldout", "last_step",
                                                               "last_heldout", "checkpoint", "other_checkpoint",
                                                               "early_stopped_at")}
                                  for name, m in monitors.items()}
        if self.is_done("rm") and self.result("rm").get("heldout_accuracy_per_head"):
            summary["reward_model"]["heldout_accuracy_per_head"] = self.result("rm")["heldout_accuracy_per_head"]
        if self.is_done("eval"):
            summary["eval"] = {}
            per_prompt: dict[str, list[float] | None] = {}
            for name in self.result("eval").get("policies", []):
                file = self.stage_dir("eval") / f"{name}.json"
                if not file.is_file():  # removed by hand: the next run evaluates it again
                    continue
                res = json.loads(file.read_text())
                summary["eval"][name] = {k: v for k, v in res.items() if k not in ("samples", "gold_per_prompt", "key")}
                per_prompt[name] = res.get("gold_per_prompt")
            # every policy against SFT (and SFT against the base model) on the same prompts
            from tether.evaluate import paired_difference

            for name, scores in per_prompt.items():
                base = "base" if name == "sft" else "sft"
                other = per_prompt.get(base)
                if name != base and name != "base" and scores and other and len(scores) == len(other):
                    summary["eval"][name][f"vs_{base}"] = paired_difference(scores, other, seed=self.cfg.seed)
        write_json(self.dir / "summary.json", summary)
        return summary


def run_pipeline(cfg: RunConfig, out_dir: str | Path | None = None, stages: list[str] | None = None) -> dict:
    return Pipeline(cfg, out_dir).run(stages)
