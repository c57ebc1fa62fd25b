"""Tests for tether.ops: hand-computed values, naive loop references and invariants."""

from __future__ import annotations

import math

import pytest
import torch

from tether.ops import (
    entropy_from_logits,
    last_true_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    token_logprobs,
)

F64 = torch.float64
SHAPES = [(1, 1), (2, 5), (4, 7), (6, 16)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_mask(batch: int, length: int, g: torch.Generator, offsets: bool = False) -> torch.Tensor:
    """[B, T] bool mask of contiguous spans. Row 0 is all ones, row 1 (if any) has a single
    token; the remaining rows get random lengths (and random start offsets if ``offsets``)."""
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


def naive_masked_sum_all(x, mask):
    total = 0.0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                total += float(x[b, t])
    return total


def naive_masked_mean_rows(x, mask):
    out = []
    for b in range(x.shape[0]):
        vals = [float(x[b, t]) for t in range(x.shape[1]) if mask[b, t]]
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return out


def naive_masked_stats(x, mask):
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(vals)
    mean = sum(vals) / n
    biased = sum((v - mean) ** 2 for v in vals) / n
    unbiased = biased * n / (n - 1) if n > 1 else biased
    return mean, biased, unbiased


# --------------------------------------------------------------------------- masked_sum


def test_masked_sum_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # all: 1 + 2 + 4 = 7; per row (dim=1): [3, 4]; per column (dim=0): [5, 2, 0]
    torch.testing.assert_close(masked_sum(x, mask), torch.tensor(7.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0], dtype=F64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        masked_sum(x, mask, dim=0), torch.tensor([5.0, 2.0, 0.0], dtype=F64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_sum_naive(shape):
    g = _gen(1)
    x = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=True)
    assert math.isclose(float(masked_sum(x, mask)), naive_masked_sum_all(x, mask), rel_tol=1e-12, abs_tol=1e-12)
    rows = masked_sum(x, mask, dim=1)
    for b in range(shape[0]):
        expected = sum(float(x[b, t]) for t in range(shape[1]) if mask[b, t])
        assert math.isclose(float(rows[b]), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_masked_sum_broadcast_mask():
    x = torch.arange(6, dtype=F64).reshape(2, 3)  # [[0,1,2],[3,4,5]]
    col_mask = torch.tensor([1, 0, 1])  # broadcasts over rows: 0+2+3+5 = 10
    assert float(masked_sum(x, col_mask)) == 10.0


# --------------------------------------------------------------------------- masked_mean


def test_masked_mean_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # all: (1 + 2 + 4) / 3 = 7/3 ; rows: [(1+2)/2, 4/1] = [1.5, 4]
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0], dtype=F64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_naive(shape):
    g = _gen(2)
    x = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=True)
    mean, _, _ = naive_masked_stats(x, mask)
    assert math.isclose(float(masked_mean(x, mask)), mean, rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(
        masked_mean(x, mask, dim=1), torch.tensor(naive_masked_mean_rows(x, mask), dtype=F64), atol=1e-12, rtol=1e-12
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_masked_mean_all_ones_is_mean(shape):
    x = torch.randn(*shape, generator=_gen(3), dtype=F64)
    ones = torch.ones(shape)
    torch.testing.assert_close(masked_mean(x, ones), x.mean(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(masked_mean(x, ones, dim=1), x.mean(dim=1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(masked_mean(x, ones, dim=0), x.mean(dim=0), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_masked_mean_ignores_outside(shape):
    g = _gen(4)
    x = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=True)
    assert (~mask).any()
    y = x.masked_fill(~mask, 1e6)
    assert torch.equal(masked_mean(x, mask), masked_mean(y, mask))
    assert torch.equal(masked_mean(x, mask, dim=1), masked_mean(y, mask, dim=1))


def test_masked_mean_bool_and_float_mask_agree():
    g = _gen(5)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    mask = ragged_mask(4, 6, g)
    torch.testing.assert_close(masked_mean(x, mask), masked_mean(x, mask.to(F64)), atol=0, rtol=0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), masked_mean(x, mask.long(), dim=1), atol=0, rtol=0)


def test_masked_mean_empty_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    out = masked_mean(x, empty)
    assert not torch.isnan(out) and float(out) == 0.0
    # an empty row gives 0 in the per-row reduction; the other row is unaffected
    rows = masked_mean(x, torch.tensor([[False, False], [True, True]]), dim=1)
    torch.testing.assert_close(rows, torch.tensor([0.0, 3.5], dtype=F64), atol=1e-12, rtol=0)


def test_masked_mean_gradient():
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1]])
    masked_mean(x, mask).backward()
    # d/dx of (x0 + x2) / 2
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.0, 0.5]], dtype=F64), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- masked_var


def test_masked_var_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # values {1, 2, 4}: mean 7/3; squared deviations 16/9, 1/9, 25/9 -> sum 42/9 = 14/3
    # biased = 14/9, unbiased = 14/3 / 2 = 7/3
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(14.0 / 9.0, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(masked_var(x, mask), torch.tensor(7.0 / 3.0, dtype=F64), atol=1e-12, rtol=0)


def test_masked_var_single_element():
    x = torch.tensor([[3.0, 9.0]], dtype=F64)
    mask = torch.tensor([[0, 1]])
    # one element: no spread, and no division by n - 1 = 0
    assert float(masked_var(x, mask)) == 0.0
    assert float(masked_var(x, mask, unbiased=False)) == 0.0


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_masked_var_naive(shape):
    g = _gen(6)
    x = torch.randn(*shape, generator=g, dtype=F64) * 3 + 1
    mask = ragged_mask(*shape, g, offsets=True)
    _, biased, unbiased = naive_masked_stats(x, mask)
    assert math.isclose(float(masked_var(x, mask, unbiased=False)), biased, rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(float(masked_var(x, mask)), unbiased, rel_tol=1e-10, abs_tol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_masked_var_all_ones_matches_torch(shape):
    x = torch.randn(*shape, generator=_gen(7), dtype=F64)
    ones = torch.ones(shape, dtype=torch.bool)
    torch.testing.assert_close(masked_var(x, ones), x.var(unbiased=True), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(masked_var(x, ones, unbiased=False), x.var(unbiased=False), atol=1e-12, rtol=1e-10)


def test_masked_var_ignores_outside():
    g = _gen(8)
    x = torch.randn(5, 6, generator=g, dtype=F64)
    mask = ragged_mask(5, 6, g, offsets=True)
    y = x.masked_fill(~mask, 1e6)
    torch.testing.assert_close(masked_var(x, mask), masked_var(y, mask), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- masked_whiten


def test_masked_whiten_hand():
    x = torch.tensor([[1.0, 2.0, 4.0, 10.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    # masked values {1, 2, 4}: mean 7/3, unbiased var 7/3 (see test_masked_var_hand)
    mean, var, eps = 7.0 / 3.0, 7.0 / 3.0, 1e-8
    scale = 1.0 / math.sqrt(var + eps)
    expected = torch.tensor([[(v - mean) * scale for v in (1.0, 2.0, 4.0, 10.0)]], dtype=F64)
    torch.testing.assert_close(masked_whiten(x, mask), expected, atol=1e-12, rtol=1e-12)
    expected_keep = torch.tensor([[(v - mean) * scale + mean for v in (1.0, 2.0, 4.0, 10.0)]], dtype=F64)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), expected_keep, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_masked_whiten_naive(shape):
    g = _gen(9)
    x = torch.randn(*shape, generator=g, dtype=F64) * 2 + 0.5
    mask = ragged_mask(*shape, g, offsets=True)
    mean, _, var = naive_masked_stats(x, mask)
    out = masked_whiten(x, mask)
    out_keep = masked_whiten(x, mask, shift_mean=False)
    for b in range(shape[0]):
        for t in range(shape[1]):
            w = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8)
            assert math.isclose(float(out[b, t]), w, rel_tol=1e-10, abs_tol=1e-10)
            assert math.isclose(float(out_keep[b, t]), w + mean, rel_tol=1e-10, abs_tol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_masked_whiten_moments(shape):
    g = _gen(10)
    x = torch.randn(*shape, generator=g, dtype=F64) * 5 + 3
    mask = ragged_mask(*shape, g, offsets=True)
    w = masked_whiten(x, mask)
    assert abs(float(masked_mean(w, mask))) < 1e-10
    # var(w) = var / (var + eps): within ~eps/var of 1
    assert abs(float(masked_var(w, mask)) - 1.0) < 1e-7
    # shift_mean=False: the masked mean is kept, only the scale changes
    k = masked_whiten(x, mask, shift_mean=False)
    assert math.isclose(float(masked_mean(k, mask)), float(masked_mean(x, mask)), rel_tol=1e-10, abs_tol=1e-10)
    assert abs(float(masked_var(k, mask)) - 1.0) < 1e-7


def test_masked_whiten_ignores_outside_values():
    g = _gen(11)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    mask = ragged_mask(4, 6, g, offsets=True)
    y = x.masked_fill(~mask, 1e6)
    torch.testing.assert_close(masked_whiten(x, mask)[mask], masked_whiten(y, mask)[mask], atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- token_logprobs


def test_token_logprobs_hand():
    # one position with logits [0, 0, log 2]: logsumexp = log(1 + 1 + 2) = log 4
    # label 2 -> log 2 - log 4 = -log 2 ; label 0 -> 0 - log 4 = -log 4
    # second position logits [1, 1, 1]: uniform -> -log 3 for any label
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [1.0, 1.0, 1.0]]], dtype=F64)
    out = token_logprobs(logits, torch.tensor([[2, 1]]))
    assert out.shape == (1, 2) and out.dtype == torch.float64  # float64 stays float64
    expected = torch.tensor([[-math.log(2.0), -math.log(3.0)]], dtype=F64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    out0 = token_logprobs(logits, torch.tensor([[0, 0]]))
    torch.testing.assert_close(out0, torch.tensor([[-math.log(4.0), -math.log(3.0)]], dtype=F64), atol=1e-12, rtol=1e-12)
    # half precision is upcast to float32 for the reduction
    out_bf16 = token_logprobs(logits.to(torch.bfloat16), torch.tensor([[2, 1]]))
    assert out_bf16.dtype == torch.float32


def test_token_logprobs_padding_label_clamped_to_zero():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]], dtype=F64)
    # -100 is clamped to id 0: log(1/4); an id >= V is clamped to V-1: log(2/4)
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[-100]])), torch.tensor([[-math.log(4.0)]], dtype=F64), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[7]])), torch.tensor([[-math.log(2.0)]], dtype=F64), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 3, 5), (3, 4, 11)])
def test_token_logprobs_naive(shape):
    g = _gen(12)
    b_, t_, v_ = shape
    logits = torch.randn(*shape, generator=g, dtype=F64) * 3
    labels = torch.randint(0, v_, (b_, t_), generator=g)
    out = token_logprobs(logits, labels)
    for b in range(b_):
        for t in range(t_):
            row = [float(z) for z in logits[b, t]]
            lse = math.log(sum(math.exp(z) for z in row))
            assert math.isclose(float(out[b, t]), row[int(labels[b, t])] - lse, rel_tol=1e-5, abs_tol=1e-5)


def test_token_logprobs_matches_log_softmax_gather():
    g = _gen(13)
    logits = torch.randn(3, 5, 17, generator=g) * 4
    labels = torch.randint(0, 17, (3, 5), generator=g)
    ref = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels), ref, atol=1e-5, rtol=1e-5)


def test_token_logprobs_normalised_over_all_labels():
    g = _gen(14)
    v = 7
    logits = torch.randn(2, 3, v, generator=g, dtype=F64) * 5
    total = torch.zeros(2, 3, dtype=F64)
    for label in range(v):
        total += token_logprobs(logits, torch.full((2, 3), label)).to(F64).exp()
    torch.testing.assert_close(total, torch.ones(2, 3, dtype=F64), atol=1e-5, rtol=0)


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    g = _gen(15)
    logits = torch.randn(1, 1, 4, generator=g, requires_grad=True)
    token_logprobs(logits, torch.tensor([[2]])).sum().backward()
    expected = -torch.softmax(logits.detach(), -1)
    expected[0, 0, 2] += 1.0
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- entropy_from_logits


def test_entropy_hand():
    # logits [0, log 3] -> p = [1/4, 3/4]; H = -(1/4 log 1/4 + 3/4 log 3/4) = log 4 - (3/4) log 3
    logits = torch.tensor([0.0, math.log(3.0)], dtype=F64)
    expected = math.log(4.0) - 0.75 * math.log(3.0)
    out = entropy_from_logits(logits)
    assert out.shape == () and out.dtype == torch.float64
    assert math.isclose(float(out), expected, rel_tol=1e-12, abs_tol=1e-12)
    assert entropy_from_logits(logits.half()).dtype == torch.float32


@pytest.mark.parametrize("v", [1, 2, 5, 50, 1000])
def test_entropy_uniform_is_log_v(v):
    logits = torch.full((2, 3, v), 0.7)
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(v)), atol=1e-5, rtol=1e-6)


def test_entropy_one_hot_like_is_zero():
    logits = torch.zeros(2, 10)
    logits[0, 3] = 100.0
    logits[1, 9] = 1000.0
    out = entropy_from_logits(logits)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.zeros(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(3,), (2, 4), (2, 3, 6)])
def test_entropy_naive(shape):
    g = _gen(16)
    logits = torch.randn(*shape, generator=g, dtype=F64) * 2
    out = entropy_from_logits(logits)
    assert out.shape == shape[:-1]
    flat_logits = logits.reshape(-1, shape[-1])
    flat_out = out.reshape(-1)
    for i in range(flat_logits.shape[0]):
        z = [float(v) for v in flat_logits[i]]
        s = sum(math.exp(v) for v in z)
        h = -sum((math.exp(v) / s) * math.log(math.exp(v) / s) for v in z)
        assert math.isclose(float(flat_out[i]), h, rel_tol=1e-5, abs_tol=1e-6)


def test_entropy_shift_invariant_and_bounded():
    g = _gen(17)
    logits = torch.randn(4, 9, generator=g) * 3
    h = entropy_from_logits(logits)
    torch.testing.assert_close(entropy_from_logits(logits + 12.5), h, atol=1e-5, rtol=1e-5)
    assert (h >= -1e-6).all() and (h <= math.log(9) + 1e-6).all()


# --------------------------------------------------------------------------- last_true_index


def test_last_true_index_hand():
    mask = torch.tensor(
        [
            [1, 1, 1, 1],  # all ones -> 3
            [1, 0, 0, 0],  # single token -> 0
            [0, 1, 1, 0],  # offset span -> 2
            [0, 0, 0, 0],  # empty -> 0
            [1, 0, 1, 0],  # gap -> 2
        ]
    )
    out = last_true_index(mask)
    assert out.dtype == torch.long
    assert out.tolist() == [3, 0, 2, 0, 2]
    assert last_true_index(mask.bool()).tolist() == [3, 0, 2, 0, 2]


@pytest.mark.parametrize("shape", SHAPES)
def test_last_true_index_naive(shape):
    g = _gen(18)
    mask = torch.rand(*shape, generator=g) < 0.5
    mask[0] = True
    out = last_true_index(mask)
    for b in range(shape[0]):
        idx = [t for t in range(shape[1]) if mask[b, t]]
        assert int(out[b]) == (idx[-1] if idx else 0)
