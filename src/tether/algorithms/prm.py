"""Process reward models: a score for each reasoning step, not only for the final answer
(Uesato et al. 2022; Lightman et al. 2023, "Let's verify step by step").

The model is the reward model's: the policy's backbone with a scalar head
(``AutoModelForSequenceClassification``, one output). A solution is its steps joined by a
separator; the head is read at the last token of each step, and a binary cross-entropy
trains each read against that step's label (1 right, 0 wrong; soft labels in between).

An outcome reward model (ORM) is the same thing with one "step", the whole solution,
labelled by whether its final answer is right: ``outcome_examples`` builds that data, so
the two are trained and compared on the same samples.

Scoring a new solution gives one probability per step; a solution's score is their minimum
(the weakest step) or product (every step right), and best-of-N keeps the highest.
"""

from __future__ import annotations

import math
import time

import torch

from tether.checkpoint import Checkpointer, LoopState, RNGState
from tether.config import PRMConfig
from tether.data.schemas import StepExample
from tether.data.tokenize import Encoder, pad_right
from tether.distributed import all_sum, all_sum_dict, local_micro
from tether.engine import BatchPlan, Engine, MetricsLogger, length_groups, plan_steps, progress_bar, token_budget
from tether.losses import step_bce_loss
from tether.models import token_scalars

__all__ = ["step_positions", "collate_steps", "train_prm", "score_steps", "aggregate_steps", "best_of_n",
           "outcome_examples", "rollout_step_rewards"]


def step_positions(encoder: Encoder, prompt, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + steps joined by ``separator`` + EOS, and the index of each
    step's last token. A step cut off by ``max_length`` gets no position (the list is
    shorter than ``steps``).

    Positions come from the token count of each prefix ``steps[:k+1]`` joined: exact for
    tokenizers that do not merge across the separator (word-level ones, and BPE with a
    newline or " ; " separator in practice)."""
    p, r = encoder.example(prompt, separator.join(steps))
    ends = []
    for k in range(len(steps)):
        n = len(encoder.tokenizer(separator.join(steps[: k + 1]), add_special_tokens=False)["input_ids"])
        if n > len(r) - 1:  # cut off (the response's last token is its EOS)
            break
        ends.append(len(p) + n - 1)
    return p + r, ends


def collate_steps(encoder: Encoder, examples: list[StepExample], separator: str) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` [B, L] and, per step, its position,
    label and mask [B, S]."""
    seqs, positions, labels = [], [], []
    for ex in examples:
        ids, ends = step_positions(encoder, ex.prompt, ex.steps, separator)
        seqs.append(ids)
        positions.append(ends)
        labels.append([float(v) for v in ex.labels[: len(ends)]])
    input_ids, attention_mask = pad_right(seqs, encoder.pad_id)
    width = max(1, max(len(p) for p in positions))
    pos = torch.zeros(len(examples), width, dtype=torch.long)
    lab = torch.zeros(len(examples), width)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, (p, lbl) in enumerate(zip(positions, labels)):
        pos[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        lab[i, : len(p)] = torch.tensor(lbl)
        mask[i, : len(p)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "step_pos": pos, "step_labels": lab,
            "step_mask": mask}


def _step_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head's value at each step's last token: [B, S]."""
    per_token = token_scalars(model, batch["input_ids"], batch["attention_mask"])
    if per_token.dim() == 3:  # an ensemble's heads: their mean
        per_token = per_token.mean(dim=-1)
    return per_token.gather(1, batch["step_pos"])


def outcome_examples(examples: list[StepExample], outcomes: list[float]) -> list[StepExample]:
    """The same solutions as one step each (all steps joined), labelled by their outcome:
    an outcome reward model's data."""
    return [StepExample(prompt=ex.prompt, steps=[ex.separator_join()], labels=[float(o)], separator=ex.separator)
            for ex, o in zip(examples, outcomes, strict=True)]


def train_prm(model, encoder: Encoder, examples: list[StepExample], cfg: PRMConfig, *, seed: int = 0,
              logger: MetricsLogger | None = None, log_every: int = 10, checkpointer: Checkpointer | None = None,
              name: str = "prm") -> dict:
    """Train ``model`` (a one-output sequence-classification model) in place on step labels.

    The loss of an optimiser step is the mean binary cross-entropy over every labelled step
    of its batch (micro-batches and processes add up to it exactly)."""
    optim = cfg.optim
    total = plan_steps(len(examples), optim.batch_size, cfg.epochs, cfg.max_steps)
    engine = Engine(model.parameters(), optim, total, name=name)
    plan = BatchPlan(len(examples), optim.batch_size, optim.micro_batch_size, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    model.train()
    loop = LoopState(last={})
    state = {"model": model, "engine": engine, "data": plan, "rng": RNGState(), "loop": loop}
    if logger is not None:
        state["metrics"] = logger
    start = checkpointer.resume(state) if checkpointer is not None else 0
    start_time = time.time()
    bar = progress_bar(total, name)
    bar.update(start)
    budget = token_budget(optim.micro_batch_tokens, device)

    def cost(i: int) -> tuple[int, int]:
        ex = examples[i]
        p, (r,) = encoder.lengths(ex.prompt, [ex.separator_join()])
        return 1, p + r

    for step in range(start, total):
        groups = length_groups(local_micro(plan.next(), optim.micro_batch_size), cost, optim.micro_batch_size, budget)
        micro = [collate_steps(encoder, [examples[i] for i in idx], cfg.separator) for idx in groups]
        n_steps = all_sum(sum(int(m["step_mask"].sum()) for m in micro))
        sums = {"loss": 0.0, "correct": 0.0}
        for m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            logits = _step_logits(model, m)
            loss = step_bce_loss(logits, m["step_labels"], m["step_mask"], normalizer=max(n_steps, 1))
            loss.backward()
            sums["loss"] += loss.detach().item()
            with torch.no_grad():
                right = ((logits > 0) == (m["step_labels"] > 0.5)) & m["step_mask"]
                sums["correct"] += float(right.sum())
        sums = all_sum_dict(sums)
        info = engine.step(sums["loss"])
        loop["last"] = last = {f"loss/{name}": sums["loss"], f"{name}/train_step_accuracy": sums["correct"] / max(n_steps, 1),
                               **{f"optim/{k}": v for k, v in info.items()}}
        if logger is not None and (step % log_every == 0 or step == total - 1):
            logger.log(step, last)
        bar.set_postfix(loss=f"{sums['loss']:.3f}", acc=f"{last[f'{name}/train_step_accuracy']:.2f}")
        bar.update(1)
        if checkpointer is not None:
            checkpointer.step(step + 1, state, final=step + 1 == total)
    bar.close()
    out = {"steps": total, "final_loss": loop["last"].get(f"loss/{name}"), "skipped_steps": engine.skipped_steps,
           "seconds": time.time() - start_time, "examples": len(examples),
           "labelled_steps": sum(len(ex.labels) for ex in examples)}
    if start:
        out["resumed_from_step"] = start
    return out


@torch.no_grad()
def score_steps(model, encoder: Encoder, prompts: list, steps: list[list[str]], separator: str,
                batch_size: int = 64) -> list[torch.Tensor]:
    """The probability that each step is right, per solution: a list of [S_i] tensors (a
    step cut off by ``max_length`` gets none)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    try:
        for b in range(0, len(prompts), batch_size):
            chunk = [StepExample(prompt=p, steps=s, labels=[0.0] * len(s), separator=separator)
                     for p, s in zip(prompts[b : b + batch_size], steps[b : b + batch_size], strict=True)]
            batch = {k: v.to(device) for k, v in collate_steps(encoder, chunk, separator).items()}
            probs = torch.sigmoid(_step_logits(model, batch).float()).cpu()
            mask = batch["step_mask"].cpu()
            out += [probs[i][mask[i]] for i in range(len(chunk))]
    finally:
        model.train(was_training)
    return out


def aggregate_steps(probs: torch.Tensor, how: str = "min") -> float:
    """A solution's score from its step probabilities: ``min`` (its weakest step), ``prod``
    (every step right, as in Lightman et al.) or ``last``. No steps: 0."""
    if probs.numel() == 0:
        return 0.0
    if how == "min":
        return float(probs.min())
    if how == "prod":
        return float(torch.log(probs.clamp_min(1e-12)).sum().exp())
    if how == "last":
        return float(probs[-1])
    raise ValueError(f"unknown aggregation {how!r}; use min, prod or last")


def best_of_n(scores: torch.Tensor, gold: torch.Tensor) -> dict:
    """Best-of-N over P prompts × N candidates: the gold of each prompt's highest-scored
    candidate (ties: the first), its mean and standard error over prompts."""
    pick = scores.argmax(dim=1)
    chosen = gold.gather(1, pick.unsqueeze(1)).squeeze(1).double()
    n = chosen.numel()
    mean = float(chosen.mean())
    se = float(chosen.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"accuracy": mean, "stderr": se, "prompts": n, "per_prompt": chosen.tolist()}


def rollout_step_rewards(model, encoder: Encoder, rollout, split, separator: str, batch_size: int = 64):
    """Dense rewards of a rollout from a PRM: each step's probability of being right at the
    response position of the step's last token.

    ``split(text) -> steps``. Returns ``(rewards [B, R], step_mask [B, R], probs)`` with
    ``probs`` each row's step probabilities; a response with no steps gets none.
    """
    steps = [split(t) for t in rollout.texts]
    probs = score_steps(model, encoder, rollout.prompts, steps, separator, batch_size)
    B, R = rollout.response_ids.shape
    rewards, mask = torch.zeros(B, R), torch.zeros(B, R, dtype=torch.bool)
    lengths = rollout.response_mask.sum(dim=1).tolist()
    for i, (row, pr) in enumerate(zip(steps, probs)):
        for k, p in enumerate(pr.tolist()):
            n = len(encoder.tokenizer(separator.join(row[: k + 1]), add_special_tokens=False)["input_ids"])
            at = min(n, int(lengths[i])) - 1
            if at >= 0:
                rewards[i, at] = p
                mask[i, at] = True
    return rewards, mask, probs
