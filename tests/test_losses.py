"""Tests for tether.losses: hand-computed values, naive loop references and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from tether.losses import (
    bradley_terry_loss,
    plackett_luce_loss,
    ppo_policy_loss,
    ranking_pairwise_loss,
    sft_loss,
    value_loss,
)
from tether.ops import masked_mean

F64 = torch.float64
SHAPES = [(1, 1), (2, 5), (4, 7), (6, 16)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_mask(batch: int, length: int, g: torch.Generator, offsets: bool = False) -> torch.Tensor:
    """Contiguous spans; row 0 all ones, row 1 a single token, other rows random lengths."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        if b == 0:
            start, n = 0, length
        elif b == 1:
            n = 1
            start = int(torch.randint(0, length, (1,), generator=g)) if offsets else 0
        else:
            n = int(torch.randint(1, length + 1, (1,), generator=g))
            start = int(torch.randint(0, length - n + 1, (1,), generator=g)) if offsets else 0
        mask[b, start : start + n] = True
    return mask


def softplus_neg(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x}), computed stably."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def close(a, b, tol=1e-10):
    a, b = (x.detach() if torch.is_tensor(x) else x for x in (a, b))
    assert math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol), (float(a), float(b))


# --------------------------------------------------------------------------- sft_loss


def test_sft_loss_hand():
    # position 0: logits [0, 0], label 0 -> p = 1/2, nll = log 2
    # position 1: logits [0, log 3], label 1 -> p = 3/4, nll = log(4/3)
    # position 2: masked out (garbage logits and a -100 label)
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)], [50.0, -50.0]]], dtype=F64)
    labels = torch.tensor([[0, 1, -100]])
    mask = torch.tensor([[1, 1, 0]])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    out = sft_loss(logits, labels, mask)
    assert out.shape == ()
    close(out, expected, 1e-6)
    # explicit normalizer: summed NLL / 4
    close(sft_loss(logits, labels, mask, normalizer=4.0), (math.log(2.0) + math.log(4.0 / 3.0)) / 4, 1e-6)
    close(sft_loss(logits, labels, mask, normalizer=torch.tensor(4.0)), (math.log(2.0) + math.log(4.0 / 3.0)) / 4, 1e-6)


def test_sft_loss_empty_mask_is_zero():
    logits = torch.randn(2, 3, 4, generator=_gen(1))
    out = sft_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    assert torch.isfinite(out) and float(out) == 0.0


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 4), (4, 7, 9)])
def test_sft_loss_naive(shape):
    g = _gen(2)
    b_, t_, v_ = shape
    logits = torch.randn(*shape, generator=g, dtype=F64) * 2
    labels = torch.randint(0, v_, (b_, t_), generator=g)
    mask = ragged_mask(b_, t_, g, offsets=True)
    total, count = 0.0, 0
    for b in range(b_):
        for t in range(t_):
            if mask[b, t]:
                row = [float(z) for z in logits[b, t]]
                total += math.log(sum(math.exp(z) for z in row)) - row[int(labels[b, t])]
                count += 1
    close(sft_loss(logits, labels, mask), total / count, 1e-5)


def test_sft_loss_ignores_masked_positions():
    g = _gen(3)
    logits = torch.randn(3, 6, 5, generator=g)
    labels = torch.randint(0, 5, (3, 6), generator=g)
    mask = ragged_mask(3, 6, g, offsets=True)
    base = sft_loss(logits, labels, mask)
    logits2 = logits.clone()
    logits2[~mask] = torch.randn(int((~mask).sum()), 5, generator=g) * 100
    labels2 = labels.masked_fill(~mask, -100)
    torch.testing.assert_close(sft_loss(logits2, labels2, mask), base, atol=0, rtol=0)
    # and the gradient at masked positions is exactly zero
    leaf = logits.clone().requires_grad_(True)
    sft_loss(leaf, labels, mask).backward()
    assert torch.all(leaf.grad[~mask] == 0)
    assert torch.any(leaf.grad[mask] != 0)


def test_sft_loss_gradient_accumulation_invariant():
    g = _gen(4)
    batch, length, vocab = 6, 8, 7
    logits = torch.randn(batch, length, vocab, generator=g, dtype=F64)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    mask = ragged_mask(batch, length, g, offsets=True)
    n_tokens = mask.sum()

    big = logits.clone().requires_grad_(True)
    big_loss = sft_loss(big, labels, mask)
    big_loss.backward()

    small = logits.clone().requires_grad_(True)
    losses = []
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):  # uneven micro-batches
        loss = sft_loss(small[sl], labels[sl], mask[sl], normalizer=n_tokens)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(sum(losses), big_loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(small.grad, big.grad, atol=1e-7, rtol=1e-5)
    # without the normalizer, micro-batch means do NOT add up (sanity check the test has teeth)
    naive = sum(sft_loss(logits[sl], labels[sl], mask[sl]) for sl in (slice(0, 2), slice(2, 3), slice(3, 6)))
    assert abs(float(naive.detach()) - float(big_loss.detach())) > 1e-3


# --------------------------------------------------------------------------- bradley_terry_loss


def test_bradley_terry_hand():
    # diff 0 -> -log σ(0) = log 2
    close(bradley_terry_loss(torch.tensor([0.3], dtype=F64), torch.tensor([0.3], dtype=F64)), math.log(2.0), 1e-12)
    # diffs [1, -2] -> mean(log(1 + e^-1), log(1 + e^2))
    chosen = torch.tensor([2.0, 0.0], dtype=F64)
    rejected = torch.tensor([1.0, 2.0], dtype=F64)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2
    close(bradley_terry_loss(chosen, rejected), expected, 1e-12)
    # margin 0.5 on the first pair: diff 0.5
    expected_m = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(2.5))) / 2
    close(bradley_terry_loss(chosen, rejected, margin=0.5), expected_m, 1e-12)


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_bradley_terry_naive(batch):
    g = _gen(5)
    chosen = torch.randn(batch, generator=g, dtype=F64) * 3
    rejected = torch.randn(batch, generator=g, dtype=F64) * 3
    margin = torch.rand(batch, generator=g, dtype=F64)
    ref = sum(softplus_neg(float(chosen[i] - rejected[i])) for i in range(batch)) / batch
    close(bradley_terry_loss(chosen, rejected), ref, 1e-10)
    ref_m = sum(softplus_neg(float(chosen[i] - rejected[i] - margin[i])) for i in range(batch)) / batch
    close(bradley_terry_loss(chosen, rejected, margin), ref_m, 1e-10)


def test_bradley_terry_shift_invariant():
    g = _gen(6)
    x = torch.randn(10, generator=g, dtype=F64)
    y = torch.randn(10, generator=g, dtype=F64)
    for c in (-3.0, 0.25, 100.0):
        torch.testing.assert_close(bradley_terry_loss(x + c, y + c), bradley_terry_loss(x, y), atol=1e-12, rtol=1e-12)
    # per-pair constant as well
    c = torch.randn(10, generator=g, dtype=F64)
    torch.testing.assert_close(bradley_terry_loss(x + c, y + c), bradley_terry_loss(x, y), atol=1e-12, rtol=1e-12)


def test_bradley_terry_margin_equals_shift():
    g = _gen(7)
    x = torch.randn(8, generator=g, dtype=F64)
    y = torch.randn(8, generator=g, dtype=F64)
    m = torch.rand(8, generator=g, dtype=F64) * 2
    torch.testing.assert_close(bradley_terry_loss(x, y, m), bradley_terry_loss(x - m, y), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bradley_terry_loss(x, y, 0.7), bradley_terry_loss(x - 0.7, y), atol=1e-12, rtol=1e-12)
    # a positive margin makes the loss larger
    assert float(bradley_terry_loss(x, y, m)) > float(bradley_terry_loss(x, y))


def test_bradley_terry_stable_for_large_gaps():
    chosen = torch.tensor([-1000.0, 1000.0], dtype=F64)
    rejected = torch.zeros(2, dtype=F64)
    # -log σ(-1000) = 1000 + log(1 + e^-1000) ~ 1000 ; -log σ(1000) ~ 0
    close(bradley_terry_loss(chosen, rejected), 500.0, 1e-12)


def test_bradley_terry_gradient():
    chosen = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dd [-log σ(d)] = -(1 - σ(d)) = -σ(-d); mean over 2 pairs
    s = 1 / (1 + math.exp(1.0))  # σ(-1)
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5 / 2, -s / 2], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(rejected.grad, -chosen.grad, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- ranking_pairwise_loss


def test_ranking_pairwise_hand():
    # scores [2, 1, 0]: pairs (0,1) d=1, (0,2) d=2, (1,2) d=1
    scores = torch.tensor([[2.0, 1.0, 0.0]], dtype=F64)
    expected = (2 * math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-2.0))) / 3
    close(ranking_pairwise_loss(scores), expected, 1e-12)
    # with the last slot padded only pair (0,1) remains
    mask = torch.tensor([[True, True, False]])
    close(ranking_pairwise_loss(scores, mask), math.log(1 + math.exp(-1.0)), 1e-12)


def naive_ranking(scores, mask=None):
    total, count = 0.0, 0
    b_, k_ = scores.shape
    for b in range(b_):
        for i in range(k_):
            for j in range(i + 1, k_):
                if mask is not None and not (mask[b, i] and mask[b, j]):
                    continue
                total += softplus_neg(float(scores[b, i] - scores[b, j]))
                count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("shape", [(1, 2), (3, 3), (5, 6)])
def test_ranking_pairwise_naive(shape):
    g = _gen(8)
    scores = torch.randn(*shape, generator=g, dtype=F64) * 2
    close(ranking_pairwise_loss(scores), naive_ranking(scores), 1e-10)
    b_, k_ = shape
    lengths = torch.randint(1, k_ + 1, (b_,), generator=g)
    lengths[0] = k_
    if b_ > 1:
        lengths[1] = 2 if k_ >= 2 else 1
    mask = torch.arange(k_).unsqueeze(0) < lengths.unsqueeze(1)
    close(ranking_pairwise_loss(scores, mask), naive_ranking(scores, mask), 1e-10)


def test_ranking_pairwise_k2_equals_bradley_terry():
    g = _gen(9)
    scores = torch.randn(7, 2, generator=g, dtype=F64)
    torch.testing.assert_close(
        ranking_pairwise_loss(scores), bradley_terry_loss(scores[:, 0], scores[:, 1]), atol=1e-12, rtol=1e-12
    )


def test_ranking_pairwise_mask_equals_truncated():
    g = _gen(10)
    full = torch.randn(1, 5, generator=g, dtype=F64)
    for n in (2, 3, 4, 5):
        padded = full.clone()
        padded[0, n:] = 1e6  # padded slots hold garbage
        mask = torch.zeros(1, 5, dtype=torch.bool)
        mask[0, :n] = True
        torch.testing.assert_close(
            ranking_pairwise_loss(padded, mask), ranking_pairwise_loss(full[:, :n]), atol=1e-12, rtol=1e-12
        )


def test_ranking_pairwise_all_ones_mask_equals_no_mask():
    g = _gen(11)
    scores = torch.randn(4, 5, generator=g, dtype=F64)
    torch.testing.assert_close(
        ranking_pairwise_loss(scores, torch.ones(4, 5, dtype=torch.bool)), ranking_pairwise_loss(scores), atol=1e-12, rtol=1e-12
    )


# --------------------------------------------------------------------------- plackett_luce_loss


def test_plackett_luce_hand():
    # scores log 3, log 2, 0 -> weights 3, 2, 1: P(ranking) = 3/6 * 2/3 * 1/1 = 1/3 -> NLL = log 3
    scores = torch.tensor([[math.log(3.0), math.log(2.0), 0.0]], dtype=F64)
    close(plackett_luce_loss(scores), math.log(3.0), 1e-12)
    # reversed order: weights 1, 2, 3: P = 1/6 * 2/5 * 1 = 1/15 -> log 15 ; batch mean (log 3 + log 15) / 2
    both = torch.cat([scores, scores.flip(-1)])
    close(plackett_luce_loss(both), (math.log(3.0) + math.log(15.0)) / 2, 1e-12)
    # padding the last slot of the first row: P = 3/5 -> log(5/3)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    close(plackett_luce_loss(both, mask), (math.log(5.0 / 3.0) + math.log(15.0)) / 2, 1e-12)


def naive_plackett_luce(scores, mask=None):
    b_, k_ = scores.shape
    total = 0.0
    for b in range(b_):
        n = k_ if mask is None else int(mask[b].sum())
        s = [float(v) for v in scores[b, :n]]
        nll = 0.0
        for i in range(n):
            m = max(s[i:])
            lse = m + math.log(sum(math.exp(v - m) for v in s[i:]))
            nll += lse - s[i]
        total += nll
    return total / b_


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 4), (5, 7)])
def test_plackett_luce_naive(shape):
    g = _gen(12)
    scores = torch.randn(*shape, generator=g, dtype=F64) * 2
    close(plackett_luce_loss(scores), naive_plackett_luce(scores), 1e-10)
    b_, k_ = shape
    lengths = torch.randint(1, k_ + 1, (b_,), generator=g)
    lengths[0] = k_
    if b_ > 1:
        lengths[1] = 1
    mask = torch.arange(k_).unsqueeze(0) < lengths.unsqueeze(1)
    close(plackett_luce_loss(scores, mask), naive_plackett_luce(scores, mask), 1e-10)


def test_plackett_luce_k2_equals_bradley_terry():
    g = _gen(13)
    scores = torch.randn(9, 2, generator=g, dtype=F64) * 3
    # P(0 over 1) = e^{s0} / (e^{s0} + e^{s1}) = σ(s0 - s1)
    torch.testing.assert_close(
        plackett_luce_loss(scores), bradley_terry_loss(scores[:, 0], scores[:, 1]), atol=1e-12, rtol=1e-12
    )


def test_plackett_luce_row_shift_invariant():
    g = _gen(14)
    scores = torch.randn(4, 5, generator=g, dtype=F64)
    c = torch.randn(4, 1, generator=g, dtype=F64) * 10
    torch.testing.assert_close(plackett_luce_loss(scores + c), plackett_luce_loss(scores), atol=1e-10, rtol=1e-10)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(plackett_luce_loss(scores + c, mask), plackett_luce_loss(scores, mask), atol=1e-10, rtol=1e-10)


def test_plackett_luce_mask_equals_truncated_and_grads_finite():
    g = _gen(15)
    full = torch.randn(1, 6, generator=g, dtype=F64)
    for n in range(1, 7):
        padded = full.clone()
        padded[0, n:] = 1e6
        padded.requires_grad_(True)
        mask = torch.zeros(1, 6, dtype=torch.bool)
        mask[0, :n] = True
        loss = plackett_luce_loss(padded, mask)
        torch.testing.assert_close(loss, plackett_luce_loss(full[:, :n]), atol=1e-12, rtol=1e-12)
        loss.backward()
        assert torch.isfinite(padded.grad).all()
        assert torch.all(padded.grad[0, n:] == 0)
        # PL gradients over one row sum to 0 (shift invariance)
        assert abs(float(padded.grad.sum())) < 1e-12


def test_plackett_luce_nonnegative_and_best_order_lowest():
    g = _gen(16)
    scores = torch.randn(3, 4, generator=g, dtype=F64)
    assert float(plackett_luce_loss(scores)) >= 0
    sorted_scores = scores.sort(dim=-1, descending=True).values
    assert float(plackett_luce_loss(sorted_scores)) < float(plackett_luce_loss(sorted_scores.flip(-1)))


# --------------------------------------------------------------------------- ppo_policy_loss


def _ppo_hand_inputs():
    #  tok | ratio | A  | -A*ratio | -A*clip(ratio) | max    | clipped active | d/dlogp
    #   0  | 1.5   |  2 |  -3.0    |  -2.4          | -2.4   | yes            | 0
    #   1  | 0.5   | -1 |   0.5    |   0.8          |  0.8   | yes            | 0
    #   2  | 1.1   |  1 |  -1.1    |  -1.1          | -1.1   | no (equal)     | -A*ratio = -1.1
    #   3  | 1.5   | -1 |   1.5    |   1.2          |  1.5   | no             | -A*ratio =  1.5
    #   4  | 0.5   |  1 |  -0.5    |  -0.8          | -0.5   | no             | -A*ratio = -0.5
    #   5  | masked out (wild values)
    ratios = [1.5, 0.5, 1.1, 1.5, 0.5, 50.0]
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.2, -0.3, -3.0]], dtype=F64)
    logp = old + torch.tensor([[math.log(r) for r in ratios]], dtype=F64)
    adv = torch.tensor([[2.0, -1.0, 1.0, -1.0, 1.0, 1000.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_ppo_policy_loss_hand_values_and_grads():
    logp, old, adv, mask = _ppo_hand_inputs()
    logp = logp.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # (-2.4 + 0.8 - 1.1 + 1.5 - 0.5) / 5 = -1.7 / 5
    close(loss, -0.34, 1e-12)
    close(stats["clipfrac"], 2 / 5, 1e-12)
    close(stats["ratio_mean"], (1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5, 1e-12)
    kl = sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 1.5, 0.5)) / 5
    close(stats["approx_kl"], kl, 1e-12)
    for v in stats.values():
        assert not v.requires_grad
    loss.backward()
    # d loss / d logp_t = d/dlogp of the active branch / 5; ratio' = ratio
    expected_grad = torch.tensor([[0.0, 0.0, -1.1 / 5, 1.5 / 5, -0.5 / 5, 0.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected_grad, atol=1e-12, rtol=1e-12)
    # advantages are constants
    assert adv.grad is None or torch.all(adv.grad == 0)


@pytest.mark.parametrize("ratio,adv", [(1.5, 2.0), (1.3, 0.1), (0.5, -1.0), (0.7, -3.0)])
def test_ppo_clipped_token_has_zero_gradient(ratio, adv):
    old = torch.tensor([[-0.7]], dtype=F64)
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, torch.tensor([[adv]], dtype=F64), torch.ones(1, 1), clip=0.2)
    bound = 1.2 if adv > 0 else 0.8
    close(loss, -adv * bound, 1e-12)
    close(stats["clipfrac"], 1.0, 0)
    loss.backward()
    assert float(logp.grad) == 0.0


@pytest.mark.parametrize("ratio,adv", [(1.5, -2.0), (0.5, 1.0), (1.1, 1.0), (0.9, -1.0)])
def test_ppo_unclipped_token_gradient(ratio, adv):
    old = torch.tensor([[-0.7]], dtype=F64)
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, torch.tensor([[adv]], dtype=F64), torch.ones(1, 1), clip=0.2)
    close(loss, -adv * ratio, 1e-12)
    close(stats["clipfrac"], 0.0, 0)
    loss.backward()
    close(logp.grad, -adv * ratio, 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_ppo_on_policy_equals_negative_mean_advantage(shape):
    g = _gen(17)
    logp = -torch.rand(*shape, generator=g, dtype=F64) * 3
    adv = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=True)
    leaf = logp.clone().requires_grad_(True)
    loss, stats = ppo_policy_loss(leaf, logp, adv, mask)
    torch.testing.assert_close(loss.detach(), -masked_mean(adv, mask), atol=1e-12, rtol=1e-12)
    assert float(stats["clipfrac"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0
    close(stats["ratio_mean"], 1.0, 1e-12)
    # vanilla policy gradient at ratio 1: dL/dlogp = -A * mask / n
    loss.backward()
    n = float(mask.sum())
    torch.testing.assert_close(leaf.grad, -adv * mask / n, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_ppo_policy_loss_naive(shape, clip):
    g = _gen(18)
    old = -torch.rand(*shape, generator=g, dtype=F64) * 3
    logp = old + torch.randn(*shape, generator=g, dtype=F64) * 0.3
    adv = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=clip)
    total, n_clip, kl, rsum, n = 0.0, 0, 0.0, 0.0, 0
    for b in range(shape[0]):
        for t in range(shape[1]):
            if not mask[b, t]:
                continue
            lr = float(logp[b, t] - old[b, t])
            r = math.exp(lr)
            a = float(adv[b, t])
            u = -a * r
            c = -a * min(max(r, 1 - clip), 1 + clip)
            total += max(u, c)
            n_clip += int(c > u)
            kl += 0.5 * lr * lr
            rsum += r
            n += 1
    close(loss, total / n, 1e-10)
    close(stats["clipfrac"], n_clip / n, 1e-12)
    close(stats["approx_kl"], kl / n, 1e-10)
    close(stats["ratio_mean"], rsum / n, 1e-10)


def test_ppo_ignores_masked_tokens():
    logp, old, adv, mask = _ppo_hand_inputs()
    loss, stats = ppo_policy_loss(logp, old, adv, mask)
    logp2, adv2 = logp.clone(), adv.clone()
    logp2[0, 5] = 30.0
    adv2[0, 5] = -1e6
    loss2, stats2 = ppo_policy_loss(logp2, old, adv2, mask)
    assert torch.equal(loss, loss2)
    for k in stats:
        assert torch.equal(stats[k], stats2[k])


# --------------------------------------------------------------------------- value_loss


def _value_hand_inputs():
    # clip 0.2
    #  tok | V      | old | R   | (V-R)^2     | V_clip | (Vc-R)^2 | max        | clipped larger | dL/dV * n / 0.5
    #   0  | 1.5    | 1.0 | 2.0 | 0.25        | 1.2    | 0.64     | 0.64       | yes            | 0
    #   1  | 1.0625 | 1.0 | 0.0 | 1.12890625  | 1.0625 | same     | 1.12890625 | no (equal)     | 2*1.0625
    #   2  | 0.5    | 1.0 | 0.0 | 0.25        | 0.8    | 0.64     | 0.64       | yes            | 0
    #   3  | 1.5    | 1.0 | 0.0 | 2.25        | 1.2    | 1.44     | 2.25       | no             | 2*1.5
    #   4  | masked out
    values = torch.tensor([[1.5, 1.0625, 0.5, 1.5, 77.0]], dtype=F64)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, -5.0]], dtype=F64)
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0, 123.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return values, old, returns, mask


def test_value_loss_hand_values_and_grads():
    values, old, returns, mask = _value_hand_inputs()
    values = values.clone().requires_grad_(True)
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, 0.5 * (0.64 + 1.12890625 + 0.64 + 2.25) / 4, 1e-12)
    close(stats["clipfrac"], 2 / 4, 1e-12)
    close(stats["error"], (0.25 + 1.12890625 + 0.25 + 2.25) / 4, 1e-12)
    for v in stats.values():
        assert not v.requires_grad
    loss.backward()
    # d/dV 0.5 * (V - R)^2 / 4 = (V - R) / 4 on unclipped tokens; 0 where the clipped branch wins
    expected = torch.tensor([[0.0, 1.0625 / 4, 0.0, 1.5 / 4, 0.0]], dtype=F64)
    torch.testing.assert_close(values.grad, expected, atol=1e-12, rtol=1e-12)


def test_value_loss_unclipped_when_within_range():
    # |V - old| <= clip everywhere -> plain 0.5 * MSE
    values = torch.tensor([[0.1, 0.4, -0.3]], dtype=F64)
    old = torch.tensor([[0.0, 0.3, -0.25]], dtype=F64)
    returns = torch.tensor([[1.0, -1.0, 0.5]], dtype=F64)
    mask = torch.ones(1, 3)
    # (0.9^2 + 1.4^2 + 0.8^2) / 3 * 0.5 = (0.81 + 1.96 + 0.64) / 6
    loss, stats = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, (0.81 + 1.96 + 0.64) / 6, 1e-12)
    close(stats["clipfrac"], 0.0, 0)
    close(stats["error"], (0.81 + 1.96 + 0.64) / 3, 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clip", [0.1, 0.5])
def test_value_loss_naive(shape, clip):
    g = _gen(19)
    old = torch.randn(*shape, generator=g, dtype=F64)
    values = old + torch.randn(*shape, generator=g, dtype=F64) * 0.5
    returns = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=True)
    loss, stats = value_loss(values, old, returns, mask, clip=clip)
    total, n_clip, err_sum, n = 0.0, 0, 0.0, 0
    for b in range(shape[0]):
        for t in range(shape[1]):
            if not mask[b, t]:
                continue
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            vc = o + min(max(v - o, -clip), clip)
            e, ec = (v - r) ** 2, (vc - r) ** 2
            total += max(e, ec)
            n_clip += int(ec > e)
            err_sum += e
            n += 1
    close(loss, 0.5 * total / n, 1e-10)
    close(stats["clipfrac"], n_clip / n, 1e-12)
    close(stats["error"], err_sum / n, 1e-10)


def test_value_loss_returns_are_constants():
    values, old, returns, mask = _value_hand_inputs()
    values = values.clone().requires_grad_(True)
    returns = returns.clone().requires_grad_(True)
    loss, _ = value_loss(values, old, returns, mask)
    loss.backward()
    assert returns.grad is None or torch.all(returns.grad == 0)
