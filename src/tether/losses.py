"""Pure loss functions. No model, no config object: tensors in, tensors out.

Shapes: B = batch, T = sequence length, V = vocabulary, K = responses per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tether.ops import masked_mean, token_logprobs

__all__ = [
    "step_bce_loss",
    "sft_loss",
    "bradley_terry_loss",
    "ranking_pairwise_loss",
    "plackett_luce_loss",
    "ranking_loss_terms",
    "ensemble_ranking_loss",
    "ppo_policy_loss",
    "value_loss",
    "DPO_VARIANTS",
    "dpo_loss",
    "simpo_loss",
    "orpo_loss",
    "grpo_policy_loss",
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


def step_bce_loss(step_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                  normalizer: float | None = None) -> torch.Tensor:
    """Binary cross-entropy of a process reward model's step logits (Lightman et al. 2023).

    Args:
        step_logits: [B, S] the head's value at each step's last token.
        labels: [B, S] 1 for a right step, 0 for a wrong one, or a probability (soft label).
        mask: [B, S] which steps exist.
        normalizer: divide the summed loss by this (the labelled steps of the whole optimiser
            batch, so that micro-batches add up); default: the steps in ``mask``.

    Returns the mean over steps of −[y·log σ(z) + (1 − y)·log(1 − σ(z))].
    """
    per_step = torch.nn.functional.binary_cross_entropy_with_logits(step_logits, labels.to(step_logits.dtype),
                                                                    reduction="none")
    total = (per_step * mask).sum()
    return total / (normalizer if normalizer is not None else mask.sum().clamp(min=1))


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


def ranking_loss_terms(scores: torch.Tensor, mask: torch.Tensor, loss: str = "bradley_terry",
                       targets: torch.Tensor | None = None, margins: torch.Tensor | None = None):
    """Per-ranking loss sums and term counts, each [B, ...] for scores [B, K, ...].

    ``bradley_terry``: the sum over the row's valid pairs i < j of
    ``−[t·log σ(Δ − m) + (1 − t)·log σ(−Δ − m)]`` with ``Δ = s_i − s_j``, and the number
    of those pairs: the expected loss when the pair is i ≻ j with probability t and j ≻ i
    otherwise, each side with its own margin. ``targets`` [B, P] give t = P(i ≻ j) for the
    P = K(K−1)/2 pairs in ``torch.triu_indices`` order (default 1: a hard ranking; 0.5: a
    tie, whose optimum is Δ = 0; a labelers' share: a soft label); ``margins`` [B, P] give
    m (default 0; Llama 2's margin for how much better). ``plackett_luce``: the row's negative log-likelihood, and 1 (hard strict
    rankings only). Trailing dimensions (e.g. the H heads of an ensemble) are carried through.
    """
    extra = scores.dim() - 2
    m = mask.view(*mask.shape, *([1] * extra)).expand_as(scores)
    if loss == "bradley_terry":
        k = scores.size(1)
        i, j = torch.triu_indices(k, k, offset=1, device=scores.device)
        pair_mask = (m[:, i] & m[:, j]).to(scores.dtype)
        delta = scores[:, i] - scores[:, j]
        m_ = 0.0 if margins is None else margins.to(scores.dtype).view(*margins.shape, *([1] * extra))
        terms = -F.logsigmoid(delta - m_)
        if targets is not None:
            t = targets.to(scores.dtype).view(*targets.shape, *([1] * extra))
            terms = t * terms - (1.0 - t) * F.logsigmoid(-delta - m_)
        terms = terms * pair_mask
        return terms.sum(dim=1), pair_mask.sum(dim=1)
    if loss == "plackett_luce":
        if targets is not None and bool((targets != 1).any()):
            raise ValueError("plackett_luce needs strict rankings with hard labels; ties and soft labels "
                             "need bradley_terry (rm.loss)")
        filled = scores.masked_fill(~m, float("-inf"))
        suffix_lse = torch.logcumsumexp(filled.flip(1), dim=1).flip(1)
        terms = (suffix_lse - filled).masked_fill(~m, 0.0)
        return terms.sum(dim=1), torch.ones_like(terms.sum(dim=1))
    raise ValueError(f"unknown ranking loss {loss!r}; use bradley_terry or plackett_luce")


def ensemble_ranking_loss(
    scores: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    loss: str = "bradley_terry",
    normaliser: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ranking loss of an ensemble of H reward heads, each on its own bootstrap sample.

    Args:
        scores: [B, K, H] scores of K ranked responses (best first) under each head.
        mask: [B, K] bool, false in padded slots.
        weights: [B, H] each ranking's weight for each head (its count in the head's
            bootstrap resample; all ones for no bootstrap).
        normaliser: [H] Σ_b weight·terms over the whole batch when this is one micro-batch
            of it (so that micro-batch losses add up to the batch's); default: this batch's.
        targets, margins: [B, P] per-pair targets and margins (see :func:`ranking_loss_terms`).

    Returns: scalar, the mean over heads of Σ_b w_bh·L_bh / Σ_b w_bh·n_b (L: the row's loss
    sum, n: its number of terms; see :func:`ranking_loss_terms`). With H = 1 and unit
    weights it is :func:`ranking_pairwise_loss` / :func:`plackett_luce_loss`.
    """
    sums, counts = ranking_loss_terms(scores, mask, loss, targets, margins)  # [B, H]
    w = weights.to(sums.dtype)
    if normaliser is None:
        normaliser = (w * counts).sum(dim=0)
    return ((w * sums).sum(dim=0) / normaliser.to(sums.dtype).clamp(min=1e-12)).mean()


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


# --------------------------------------------------------------------------- the DPO family
#
# Inputs are sequence log-probs: the sum over a response's tokens of log π(y_t | x, y_<t),
# shape [B]. h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) is the
# difference of implicit rewards divided by β (Rafailov et al. 2023, eq. 7).


def _dpo_sigmoid(h: torch.Tensor, beta: float, label_smoothing, targets=None) -> torch.Tensor:
    # DPO (Rafailov et al. 2023, eq. 7); with ε > 0 the conservative DPO of Mitchell 2023:
    # the label is taken to be flipped with probability ε. A target t = P(chosen ≻ rejected)
    # (a soft label; 0.5 for a tie) gives the label probability q = t(1 − ε) + (1 − t)ε.
    q = 1.0 - label_smoothing if targets is None else targets * (1.0 - label_smoothing) + (1.0 - targets) * label_smoothing
    return -q * F.logsigmoid(beta * h) - (1.0 - q) * F.logsigmoid(-beta * h)


def _dpo_ipo(h: torch.Tensor, beta: float, label_smoothing, targets=None) -> torch.Tensor:  # noqa: ARG001
    # IPO (Azar et al. 2023, eq. 17): regress h onto 1/(2β) instead of pushing it to infinity;
    # with a target t = P(chosen ≻ rejected) onto (t − 1/2)/β (0 for a tie).
    goal = 1.0 / (2.0 * beta) if targets is None else (targets - 0.5) / beta
    return (h - goal) ** 2


def _dpo_hinge(h: torch.Tensor, beta: float, label_smoothing, targets=None) -> torch.Tensor:  # noqa: ARG001
    # SLiC-HF's calibration loss (Zhao et al. 2023): max(0, 1 − β·h).
    if targets is not None and bool((targets != 1).any()):
        raise ValueError("the hinge loss has no form for ties or soft labels; use sigmoid or ipo")
    return torch.relu(1.0 - beta * h)


#: the variants of :func:`dpo_loss`, by name: ``loss_per_pair(h, beta, label_smoothing)``.
DPO_VARIANTS = {"sigmoid": _dpo_sigmoid, "ipo": _dpo_ipo, "hinge": _dpo_hinge}


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        margins = chosen_rewards - rejected_rewards
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": margins.mean(),
            "rewards/accuracy": (margins > 0).to(margins.dtype).mean(),
        }


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation and its variants.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] sequence log-probs of the preferred
            and the dispreferred response under the policy (with gradients).
        ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference.
        beta: β, the strength of the implicit KL tether to the reference.
        variant: ``"sigmoid"`` (DPO), ``"ipo"`` or ``"hinge"``; see :data:`DPO_VARIANTS`.
            IPO is usually given length-averaged log-probs (as its paper does).
        label_smoothing: ε ∈ [0, 0.5), sigmoid only: conservative DPO for noisy labels.
        targets: optional [B] P(chosen ≻ rejected) of each pair (a soft label, 0.5 for a
            tie; default 1): sigmoid and IPO only.

    Returns: ``(loss, metrics)``; loss = mean over pairs of the variant's loss of
    ``h = (π_w − ref_w) − (π_l − ref_l)``. Metrics (detached): the implicit rewards
    ``β(log π − log π_ref)`` of chosen and rejected (``rewards/chosen``, ``rewards/rejected``),
    their mean margin, the share of pairs whose margin is positive (``rewards/accuracy``),
    and the mean sequence log-probs (``logps/chosen``, ``logps/rejected``).
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; choose one of {sorted(DPO_VARIANTS)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and variant != "sigmoid":
        raise ValueError("label_smoothing applies to the sigmoid variant only")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    if targets is not None:
        targets = targets.to(chosen.dtype)
    losses = DPO_VARIANTS[variant](chosen - rejected, beta, label_smoothing, targets)
    metrics = _pair_metrics(beta * chosen.detach(), beta * rejected.detach())
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return losses.mean(), metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (Meng et al. 2024, eq. 6): reference-free and length-normalised.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed sequence log-probs.
        chosen_lengths, rejected_lengths: [B] response lengths in tokens (≥ 1).
        beta: scale of the length-normalised reward ``β/|y| · log π(y|x)``.
        gamma: target reward margin γ.
        label_smoothing: ε, as in conservative DPO.
        targets: optional [B] P(chosen ≻ rejected), as in :func:`dpo_loss`: the loss is
            t·L(r_w − r_l) + (1 − t)·L(r_l − r_w), so a tie's optimum is r_w = r_l.

    Returns: ``(loss, metrics)``; loss = mean of
    ``−(1−ε) log σ(r_w − r_l − γ) − ε log σ(−(r_w − r_l − γ))`` with ``r = β/|y| log π(y|x)``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    rejected = beta * policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    z = chosen - rejected - gamma
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if targets is not None:  # the expected loss over the label: reversed with probability 1 − t
        t = targets.to(z.dtype)
        z_rev = -(chosen - rejected) - gamma
        reversed_ = -(1.0 - label_smoothing) * F.logsigmoid(z_rev) - label_smoothing * F.logsigmoid(-z_rev)
        losses = t * losses + (1.0 - t) * reversed_
    metrics = _pair_metrics(chosen.detach(), rejected.detach())
    metrics["logps/chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps/rejected"] = policy_rejected_logps.detach().mean()
    return losses.mean(), metrics


def _log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) for p = exp(avg_logps) < 1, computed as ``a − log(1 − e^a)``."""
    a = avg_logps.clamp(max=-1e-6)
    return a - torch.log(-torch.expm1(a))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    lam: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024, eqs. 6–7): SFT on the chosen response plus an odds-ratio term,
    reference-free.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed sequence log-probs.
        chosen_lengths, rejected_lengths: [B] response lengths in tokens (≥ 1).
        lam: λ, the weight of the odds-ratio term.

    Returns: ``(loss, metrics)``; with ``P(y) = exp(log π(y|x)/|y|)`` (the per-token
    geometric mean) and ``odds(y) = P/(1−P)``: loss = mean over pairs of
    ``−log π(y_w|x)/|y_w| − λ log σ(log odds(y_w) − log odds(y_l))``. Metrics: ``loss/sft``,
    ``loss/or``, ``log_odds_ratio`` and the pair metrics of ``λ·log odds``.
    """
    avg_chosen = policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)
    avg_rejected = policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    log_odds_ratio = _log_odds(avg_chosen) - _log_odds(avg_rejected)
    sft = -avg_chosen.mean()
    odds_term = -F.logsigmoid(log_odds_ratio).mean()
    metrics = _pair_metrics(lam * avg_chosen.detach(), lam * avg_rejected.detach())
    metrics.update({"loss/sft": sft.detach(), "loss/or": odds_term.detach(),
                    "log_odds_ratio": log_odds_ratio.detach().mean()})
    return sft + lam * odds_term, metrics


# --------------------------------------------------------------------------- GRPO


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregation: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective (Shao et al. 2024, eq. 3) as a loss to minimise.

    Args:
        logprobs, old_logprobs: [B, T] log-probs of the sampled tokens under the current
            policy and under the policy that sampled them.
        advantages: [B] one advantage per sequence (or [B, T] per token); constants.
        mask: [B, T] 1 on response tokens.
        clip: ε of the clipped ratio.
        ref_logprobs: [B, T] the reference's log-probs; needed when ``beta > 0``.
        beta: weight of the k3 KL estimate to the reference, added to the loss per token.
        aggregation: ``"token"``: every response token of the batch weighs the same (DAPO);
            ``"sequence"``: mean over each sequence's tokens, then over sequences (GRPO).

    Returns: ``(loss, stats)``; per token ``ℓ_t = max(−A·ρ_t, −A·clip(ρ_t, 1−ε, 1+ε)) + β·k3_t``
    with ``ρ_t = exp(logπ − logπ_old)`` and ``k3_t = e^{ref−logπ} − (ref − logπ) − 1``,
    aggregated as chosen. ``stats``: ``clipfrac``, ``approx_kl`` (to the old policy) and, with
    a reference, ``kl_ref`` (mean k3); all detached.
    """
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    kl = None
    if ref_logprobs is not None:
        log_r = ref_logprobs.detach() - logprobs
        kl = torch.expm1(log_r) - log_r
        if beta > 0:
            per_token = per_token + beta * kl
    maskf = mask.to(per_token.dtype)
    if aggregation == "token":
        loss = masked_mean(per_token, maskf)
    else:
        loss = ((per_token * maskf).sum(1) / maskf.sum(1).clamp(min=1.0)).mean()
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), maskf),
            "approx_kl": masked_mean(0.5 * log_ratio**2, maskf),
        }
        if kl is not None:
            stats["kl_ref"] = masked_mean(kl, maskf)
    return loss, stats
