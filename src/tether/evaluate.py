"""Held-out evaluation of a policy: gold score (mean ± standard error over prompts), KL to
a reference policy, response length, and a few samples to read."""

from __future__ import annotations

import math
import random

import torch

from tether.config import EvalConfig
from tether.data.tokenize import Encoder
from tether.models import sequence_logprobs
from tether.rollout import generate, trimmed_batch
from tether.tasks.base import Task

__all__ = ["evaluate_policy", "rollout_kl", "mean_stderr", "bootstrap_ci"]


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def bootstrap_ci(values: list[float], *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(alpha / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return lo, hi


def paired_difference(policy: list[float], baseline: list[float], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two policies' per-prompt scores on the same prompts (same order).

    d_i = policy_i − baseline_i; the mean of d, its standard error sd(d)/√n (the paired s.e.:
    what the two policies share per prompt, the prompt's difficulty, cancels), a percentile
    bootstrap 95% interval over prompts, n, and ``z`` = mean / paired s.e. The combined
    (unpaired) s.e. √(se_a² + se_b²) is given beside it, as a reviewer reading two separate
    means would compute it.
    """
    if len(policy) != len(baseline):
        raise ValueError(f"paired_difference: {len(policy)} and {len(baseline)} prompts; a paired "
                         "comparison needs the same prompts for both policies")
    diffs = [a - b for a, b in zip(policy, baseline)]
    mean, se = mean_stderr(diffs)
    lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed) if diffs else (float("nan"), float("nan"))
    se_a, se_b = mean_stderr(policy)[1], mean_stderr(baseline)[1]
    combined = math.sqrt(se_a ** 2 + se_b ** 2)
    return {"mean": mean, "stderr": se, "ci95": [lo, hi], "n": len(diffs),
            "z": mean / se if se and se > 0 else float("nan"),
            "combined_stderr": combined, "z_combined": mean / combined if combined > 0 else float("nan")}


@torch.no_grad()
def rollout_kl(policy, reference, rollout, batch_size: int = 64) -> torch.Tensor:
    """Per-sample Σ_t (log π − log π_ref) over each response of a rollout sampled from
    ``policy``: [B], whose mean is an unbiased estimate of the sequence KL(π‖π_ref).
    ``reference`` None: the policy with its LoRA adapters disabled. log π is the rollout's own
    (``generate(..., logprobs=True)``: read while sampling) where it has them, else a forward
    pass; log π_ref is always a forward pass of the reference."""
    from tether.models import reference_context

    device = next(policy.parameters()).device
    kls = torch.zeros(len(rollout))
    # rows of similar length together, each chunk trimmed of its all-padding columns
    order = torch.argsort(rollout.attention_mask.sum(dim=1), stable=True)
    for b in range(0, len(rollout), batch_size):
        rows = order[b : b + batch_size]
        ids, att, start, width = trimmed_batch(rollout, rows, device)
        m = rollout.response_mask[rows][:, :width].to(device).float()
        if rollout.logprobs is not None:
            lp = rollout.logprobs[rows][:, :width].to(device)
        else:
            lp = sequence_logprobs(policy, ids, att, start)
        with reference_context(policy, reference) as ref:
            rp = sequence_logprobs(ref, ids, att, start)
        kls[rows] = ((lp - rp).float() * m).sum(dim=1).cpu()
    return kls


@torch.no_grad()
def evaluate_policy(
    policy,
    encoder: Encoder,
    task: Task,
    prompts: list,
    cfg: EvalConfig,
    *,
    reference=None,
    seed: int = 0,
    n_samples_kept: int = 8,
    progress=None,
) -> dict:
    """Sample ``cfg.samples_per_prompt`` responses per held-out prompt and score them.

    The standard error is over prompts (each prompt's samples are averaged first), so
    repeated samples of one prompt never pretend to be independent evidence. With a
    ``reference`` the sequence KL(π‖π_ref) is estimated from the same samples as the mean
    over samples of Σ_t (log π − log π_ref) (an unbiased estimator).
    """
    prompts = prompts[: cfg.n_prompts]
    repeated = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    # with a reference: the sampling log-probs spare the KL estimate a forward pass of the policy
    rollout = generate(policy, encoder, repeated, cfg.generation, seed=seed, progress=progress,
                       logprobs=reference is not None)
    gold = task.gold_batch(repeated, rollout.texts)
    k = cfg.samples_per_prompt
    per_prompt = [sum(gold[i * k : (i + 1) * k]) / k for i in range(len(prompts))]
    mean, stderr = mean_stderr(per_prompt)
    lo, hi = bootstrap_ci(per_prompt, seed=seed)
    result = {
        "gold_mean": mean,
        "gold_stderr": stderr,
        "gold_ci95": [lo, hi],
        "n": len(prompts),
        "n_samples": len(repeated),
        "length_mean": float(rollout.lengths.float().mean()),
        "ended_frac": float(rollout.ended.float().mean()),
        "gold_per_prompt": per_prompt,
    }
    if hasattr(task, "breakdown"):  # e.g. the instruct task: success rate per kind of instruction
        result["breakdown"] = task.breakdown(repeated, rollout.texts)
        if hasattr(task, "breakdown_counts"):
            result["breakdown_n"] = task.breakdown_counts(prompts)
    if reference is not None:
        kls = rollout_kl(policy, reference, rollout, cfg.generation.batch_size)
        kl_mean, kl_stderr = mean_stderr(kls.tolist())
        result["kl_to_ref"] = kl_mean
        result["kl_to_ref_stderr"] = kl_stderr
    result["samples"] = [
        {"prompt": repeated[i], "response": rollout.texts[i], "gold": gold[i]}
        for i in range(0, min(len(repeated), n_samples_kept * k), k)
    ]
    return result
