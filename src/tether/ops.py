"""Pure tensor helpers shared by the losses and the algorithms.

Every function here is a function of tensors only: no model, no config, no state.
Shapes use B = batch, T = sequence length, V = vocabulary size.
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "token_logprobs",
    "entropy_from_logits",
    "last_true_index",
]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision → float32 for numerically delicate reductions; float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is true/1. ``mask`` broadcasts against ``x``."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is true.

    Args:
        x: any shape, e.g. [B, T].
        mask: same shape as ``x`` (bool or 0/1).
        dim: reduce over this dimension only (e.g. ``dim=1`` gives one mean per row, [B]);
            ``None`` reduces over everything to a scalar.

    A row (or the whole tensor) with no true entry has mean 0, never NaN.
    """
    mask = mask.to(x.dtype)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (scalar); Bessel-corrected when ``unbiased``."""
    mean = masked_mean(x, mask)
    centred_sq = (x - mean) ** 2
    var = masked_mean(centred_sq, mask)
    if unbiased:
        n = mask.to(x.dtype).sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its masked entries.

    Returns ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added
    back, so only the scale changes (used for rewards, whose sign carries meaning).
    Entries outside the mask are transformed the same way but carry no meaning; callers
    multiply by the mask where it matters. Shape: same as ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under its aligned logits.

    Args:
        logits: [B, T, V], where ``logits[:, t]`` is the distribution that predicts
            ``labels[:, t]`` (the caller does the usual one-position shift).
        labels: [B, T] token ids. Ids outside ``[0, V)`` (e.g. -100 padding) are clamped
            to 0; mask those positions out afterwards.

    Returns: [B, T] log-probs (float32, or float64 for float64 logits), computed as
    ``logit[label] - logsumexp(logits)`` (no [B, T, V] log-softmax is materialised).
    """
    logits = _upcast(logits)
    safe = labels.clamp(min=0, max=logits.size(-1) - 1)
    picked = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    Args:
        logits: [..., V]. Returns: [...] in nats, ``logsumexp(z) - sum softmax(z) * z``
        (float32, or float64 for float64 logits).
    """
    logits = _upcast(logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Column index of the last true entry in each row of a [B, T] mask ([B], long).

    Rows with no true entry give 0.
    """
    mask = mask.to(torch.long)
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return (positions * mask).max(dim=1).values
