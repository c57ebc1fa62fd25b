"""Pure loss functions. No model, no config object: tensors in, tensors out.

Shapes: B = batch, T = sequence length, V = vocabulary, K = responses per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.ops import masked_mean, token_logprobs

__all__ = [
    "sft_loss",
    "bradley_terry_loss",
    "ranking_pairwise_loss",
    "plackett_luce_loss",
    "ppo_policy_loss",
    "value_loss",
]


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens only.

    Args:
        logits: [B, T, V]; ``logits[:, t]`` predicts ``labels[:, t]`` (already shifted).
        labels: [B, T] target ids.
        loss_mask: [B, T], 1 on response tokens (prompt and padding are 0).
        normalizer: divide the summed NLL by this instead of ``loss_mask.sum()``. Under
            gradient accumulation pass the response-token count of the whole accumulated
            batch, so that k micro-batches give exactly the gradient of one big batch.

    Returns: scalar, mean NLL per response token.
    """
    nll = -token_logprobs(logits, labels)
    mask = loss_mask.to(nll.dtype)
    total = (nll * mask).sum()
    denom = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
    return total / denom


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Pairwise Bradley–Terry loss: mean of ``-log σ(r_w - r_l - margin)``.

    Args:
        chosen_rewards: [B] scalar rewards of the preferred responses.
        rejected_rewards: [B] scalar rewards of the dispreferred responses.
        margin: optional [B] (or scalar) required gap, as in Llama-2's margin loss.

    Returns: scalar.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def ranking_pairwise_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT's ranking loss: Bradley–Terry over all K(K−1)/2 pairs of a ranking.

    Args:
        scores: [B, K] rewards of K responses, ordered best first.
        mask: optional [B, K] bool, false where a ranking has fewer than K responses
            (padding at the end); pairs touching a padded slot are ignored.

    Returns: scalar, mean of ``-log σ(s_i - s_j)`` over every pair i < j (i ranked above j)
    of every row — each comparison weighs the same, as in Ouyang et al. 2022, eq. 1.
    """
    k = scores.size(1)
    i, j = torch.triu_indices(k, k, offset=1, device=scores.device)
    pair_loss = -F.logsigmoid(scores[:, i] - scores[:, j])  # [B, P]
    if mask is None:
        return pair_loss.mean()
    pair_mask = mask[:, i] & mask[:, j]
    return masked_mean(pair_loss, pair_mask)


def plackett_luce_loss(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plackett–Luce negative log-likelihood of a full ranking.

    Args:
        scores: [B, K] rewards of K responses, ordered best first.
        mask: optional [B, K] bool; padded slots must come last in each row.

    Returns: scalar, mean over rows of ``-Σ_i [s_i - log Σ_{j ≥ i} exp s_j]``
    (the probability of choosing the best, then the best of the rest, and so on).
    """
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # logsumexp over the suffix s_i..s_{K-1}: cumulative logsumexp of the reversed row.
    suffix_lse = torch.logcumsumexp(scores.flip(-1), dim=-1).flip(-1)
    terms = suffix_lse - scores
    if mask is not None:
        terms = terms.masked_fill(~mask, 0.0)
    return terms.sum(dim=-1).mean()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    Args:
        logprobs: [B, T] log π_θ(a_t|s_t) of the taken tokens under the current policy.
        old_logprobs: [B, T] the same under the policy that generated the rollout.
        advantages: [B, T] per-token advantages (treated as constants).
        mask: [B, T] 1 on response tokens.
        clip: ε, the ratio is clipped to [1 − ε, 1 + ε].

    Returns: ``(loss, stats)``; loss = masked mean over all response tokens of
    ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))`` with ρ = exp(logπ − logπ_old). ``stats`` holds
    ``clipfrac`` (share of tokens where the clipped term is active), ``approx_kl``
    (masked mean of ½(logπ − logπ_old)²) and ``ratio_mean``; all detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in OpenAI baselines' PPO2).

    Args:
        values: [B, T] current value predictions V_θ(s_t).
        old_values: [B, T] predictions at rollout time.
        returns: [B, T] targets R_t (e.g. GAE advantages + old values).
        mask: [B, T] 1 on response tokens.
        clip: V is kept within ``old ± clip`` in the clipped branch.

    Returns: ``(loss, stats)``; loss = 0.5 · masked mean of ``max((V−R)², (V_clip−R)²)``
    with ``V_clip = old + clamp(V − old, −clip, clip)``. ``stats``: ``clipfrac`` (share of
    tokens where the clipped branch is larger) and ``error`` (masked mean of (V−R)²).
    """
    returns = returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask),
            "error": masked_mean(err, mask),
        }
    return loss, stats
