"""Tests for tether.advantages: GAE, KL estimators, KL-penalised rewards and KL controllers."""

from __future__ import annotations

import math

import pytest
import torch

from tether.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_baseline,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalized_rewards,
    rloo_advantages,
)

F64 = torch.float64
SHAPES = [(1, 1), (2, 5), (4, 7), (6, 16)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ragged_mask(batch: int, length: int, g: torch.Generator, offsets: bool = False) -> torch.Tensor:
    """Contiguous spans; row 0 all ones, row 1 a single token, other rows random lengths
    (and random start offsets, i.e. a prompt before the response, if ``offsets``)."""
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


def close(a, b, tol=1e-10):
    a, b = (x.detach() if torch.is_tensor(x) else x for x in (a, b))
    assert math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol), (float(a), float(b))


# --------------------------------------------------------------------------- gae


def naive_gae(rewards, values, mask, gamma, lam):
    b_, t_ = rewards.shape
    adv = [[0.0] * t_ for _ in range(b_)]
    ret = [[0.0] * t_ for _ in range(b_)]
    for b in range(b_):
        idx = [t for t in range(t_) if mask[b, t]]
        first, last = idx[0], idx[-1]
        running = 0.0
        for t in range(last, first - 1, -1):
            next_v = float(values[b, t + 1]) if t + 1 <= last else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + float(values[b, t])
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


def test_gae_hand():
    gamma, lam = 0.9, 0.8  # γλ = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 99.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: δ2 = 1 - 0.7 = 0.3                    A2 = 0.3
    #        δ1 = 0 + 0.9*0.7 - 0.6 = 0.03         A1 = 0.03 + 0.72*0.3   = 0.246
    #        δ0 = 0 + 0.9*0.6 - 0.5 = 0.04         A0 = 0.04 + 0.72*0.246 = 0.21712
    # row 1 (ends at t=1, V(s_2) treated as 0):
    #        δ1 = 1.0 - 0.4 = 0.6                  A1 = 0.6
    #        δ0 = 0.5 + 0.9*0.4 - 0.2 = 0.66       A0 = 0.66 + 0.72*0.6   = 1.092
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3], [1.092, 0.6, 0.0]], dtype=F64), atol=1e-12, rtol=0)
    # R = A + V on the mask, 0 elsewhere
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0], [1.292, 1.0, 0.0]], dtype=F64), atol=1e-12, rtol=0)


def test_gae_leading_prompt_zeros_hand():
    # mask [0, 1, 1]: the episode is t = 1..2; position 0 gets 0
    rewards = torch.tensor([[5.0, 0.0, 2.0]], dtype=F64)
    values = torch.tensor([[3.0, 1.0, 0.5]], dtype=F64)
    mask = torch.tensor([[0, 1, 1]])
    # γ = 1, λ = 0.5: δ2 = 2 - 0.5 = 1.5, A2 = 1.5 ; δ1 = 0 + 0.5 - 1 = -0.5, A1 = -0.5 + 0.5*1.5 = 0.25
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.25, 1.5]], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[0.0, 1.25, 2.0]], dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("offsets", [False, True])
def test_gae_naive(shape, gamma, lam, offsets):
    g = _gen(1)
    rewards = torch.randn(*shape, generator=g, dtype=F64)
    values = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g, offsets=offsets)
    # garbage outside the mask must not leak in
    rewards = rewards.masked_fill(~mask, 1e6)
    values = values.masked_fill(~mask, -1e6)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ret, ref_ret, atol=1e-10, rtol=1e-10)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_gae_gamma1_lam1_is_reward_to_go_minus_value(shape):
    g = _gen(2)
    rewards = torch.randn(*shape, generator=g, dtype=F64)
    values = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    m = mask.to(F64)
    to_go = (rewards * m).flip(-1).cumsum(-1).flip(-1)  # Σ_{k ≥ t} r_k over the mask
    torch.testing.assert_close(adv, (to_go - values) * m, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ret, to_go * m, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
def test_gae_lam0_is_one_step_td(shape):
    g = _gen(3)
    gamma = 0.9
    rewards = torch.randn(*shape, generator=g, dtype=F64)
    values = torch.randn(*shape, generator=g, dtype=F64)
    mask = ragged_mask(*shape, g)
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    for b in range(shape[0]):
        last = max(t for t in range(shape[1]) if mask[b, t])
        for t in range(last + 1):
            nv = float(values[b, t + 1]) if t < last else 0.0
            close(adv[b, t], float(rewards[b, t]) + gamma * nv - float(values[b, t]), 1e-12)


def test_gae_does_not_mutate_inputs():
    g = _gen(4)
    rewards = torch.randn(3, 5, generator=g, dtype=F64)
    values = torch.randn(3, 5, generator=g, dtype=F64)
    mask = ragged_mask(3, 5, g)
    r0, v0, m0 = rewards.clone(), values.clone(), mask.clone()
    gae(rewards, values, mask)
    assert torch.equal(rewards, r0) and torch.equal(values, v0) and torch.equal(mask, m0)


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_hand():
    # π = 0.5, π_ref = 0.25: log ratio = log 2, r = π_ref/π = 0.5
    logp = torch.tensor([math.log(0.5), math.log(0.25), -1.0], dtype=F64)
    ref = torch.tensor([math.log(0.25), math.log(0.5), -1.0], dtype=F64)
    l2 = math.log(2.0)
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([l2, -l2, 0.0], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.5 * l2**2, 0.5 * l2**2, 0.0], dtype=F64), atol=1e-12, rtol=0)
    # k3 = (r - 1) - log r: r = 0.5 -> -0.5 + log 2 ; r = 2 -> 1 - log 2 ; r = 1 -> 0
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([-0.5 + l2, 1.0 - l2, 0.0], dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (4, 9)])
def test_kl_estimators_naive(shape):
    g = _gen(5)
    logp = -torch.rand(*shape, generator=g, dtype=F64) * 5
    ref = -torch.rand(*shape, generator=g, dtype=F64) * 5
    k1, k2, k3 = kl_k1(logp, ref), kl_k2(logp, ref), kl_k3(logp, ref)
    assert k1.shape == k2.shape == k3.shape == shape
    for b in range(shape[0]):
        for t in range(shape[1]):
            a, c = float(logp[b, t]), float(ref[b, t])
            r = math.exp(c - a)
            close(k1[b, t], a - c, 1e-12)
            close(k2[b, t], 0.5 * (a - c) ** 2, 1e-12)
            close(k3[b, t], (r - 1) - math.log(r), 1e-10)


def test_kl_k2_k3_nonnegative():
    g = _gen(6)
    logp = torch.randn(1000, generator=g, dtype=F64) * 5
    ref = torch.randn(1000, generator=g, dtype=F64) * 5
    assert torch.all(kl_k3(logp, ref) >= 0)
    assert torch.all(kl_k2(logp, ref) >= 0)
    assert torch.all(kl_k3(logp, logp) == 0)
    # k1 can be negative
    assert torch.any(kl_k1(logp, ref) < 0)


def test_kl_k3_small_log_ratio_precise():
    # k3 ≈ x²/2 for tiny x = log r (expm1 keeps it precise; exp(x) - 1 would lose it)
    x = 1e-6
    out = kl_k3(torch.tensor([0.0], dtype=F64), torch.tensor([x], dtype=F64))
    # e^x - 1 - x = x²/2 + x³/6 + O(x⁴) ≈ 5e-13; relative tolerance only (no absolute slack)
    assert math.isclose(float(out), x * x / 2 + x**3 / 6, rel_tol=1e-6, abs_tol=0.0)


P = [0.5, 0.3, 0.2]
Q = [0.2, 0.3, 0.5]
TRUE_KL = sum(p * math.log(p / q) for p, q in zip(P, Q))  # 0.5 log 2.5 + 0.2 log 0.4 ≈ 0.2749


def test_kl_estimators_exact_expectation():
    # E_{x~p}[k(x)] computed exactly as Σ_x p(x) k(x): k1 and k3 are unbiased
    logp = torch.tensor([math.log(p) for p in P], dtype=F64)
    logq = torch.tensor([math.log(q) for q in Q], dtype=F64)
    w = torch.tensor(P, dtype=F64)
    close((w * kl_k1(logp, logq)).sum(), TRUE_KL, 1e-12)
    close((w * kl_k3(logp, logq)).sum(), TRUE_KL, 1e-12)
    # k2 is biased: E[½ log²(p/q)] = ½ (0.5 log² 2.5 + 0.2 log² 0.4)
    close((w * kl_k2(logp, logq)).sum(), 0.5 * (0.5 * math.log(2.5) ** 2 + 0.2 * math.log(0.4) ** 2), 1e-12)


def test_kl_estimators_monte_carlo():
    # 200k samples from p: per-sample std of k1 is ≈ 0.71 and of k3 ≈ 0.25, so the standard
    # errors are ≈ 0.0016 and 0.0006; a tolerance of 0.01 is > 6 standard errors.
    n = 200_000
    g = _gen(7)
    idx = torch.multinomial(torch.tensor(P, dtype=F64), n, replacement=True, generator=g)
    logp = torch.log(torch.tensor(P, dtype=F64))[idx]
    logq = torch.log(torch.tensor(Q, dtype=F64))[idx]
    assert abs(float(kl_k1(logp, logq).mean()) - TRUE_KL) < 0.01
    assert abs(float(kl_k3(logp, logq).mean()) - TRUE_KL) < 0.01
    # sampling from the wrong distribution (q) must not give KL(p||q): the test has teeth
    idx_q = torch.multinomial(torch.tensor(Q, dtype=F64), n, replacement=True, generator=g)
    wrong = kl_k1(torch.log(torch.tensor(P, dtype=F64))[idx_q], torch.log(torch.tensor(Q, dtype=F64))[idx_q]).mean()
    assert abs(float(wrong) - TRUE_KL) > 0.1


# --------------------------------------------------------------------------- kl_penalized_rewards


def test_kl_penalized_rewards_hand():
    beta = 0.1
    scores = torch.tensor([1.0, 2.0], dtype=F64)
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: logπ - logπ_ref = [0.5, -1, 0] -> -0.1 * = [-0.05, 0.1, 0]; + score 1 at t = 2
    # row 1: [1, 0, (-3 masked)]            -> [-0.1, 0, 0];            + score 2 at t = 1
    expected = torch.tensor([[-0.05, 0.1, 1.0], [-0.1, 2.0, 0.0]], dtype=F64)
    out = kl_penalized_rewards(scores, logp, ref, mask, beta)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_kl_penalized_rewards_prompt_offset_hand():
    # mask [0, 1, 1, 0]: score lands on t = 2 ; positions 0 and 3 are 0
    scores = torch.tensor([3.0], dtype=F64)
    logp = torch.tensor([[-9.0, -1.0, -1.0, -9.0]], dtype=F64)
    ref = torch.tensor([[0.0, -1.25, -0.5, 0.0]], dtype=F64)
    mask = torch.tensor([[False, True, True, False]])
    # t=1: -0.2 * 0.25 = -0.05 ; t=2: -0.2 * (-0.5) = 0.1, + 3
    out = kl_penalized_rewards(scores, logp, ref, mask, beta=0.2)
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.05, 3.1, 0.0]], dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offsets", [False, True])
def test_kl_penalized_rewards_naive(shape, offsets):
    g = _gen(8)
    beta = 0.05
    scores = torch.randn(shape[0], generator=g, dtype=F64)
    logp = -torch.rand(*shape, generator=g, dtype=F64) * 4
    ref = -torch.rand(*shape, generator=g, dtype=F64) * 4
    mask = ragged_mask(*shape, g, offsets=offsets)
    logp_before, ref_before = logp.clone(), ref.clone()
    out = kl_penalized_rewards(scores, logp, ref, mask, beta)
    for b in range(shape[0]):
        last = max(t for t in range(shape[1]) if mask[b, t])
        for t in range(shape[1]):
            expected = 0.0
            if mask[b, t]:
                expected = -beta * (float(logp[b, t]) - float(ref[b, t]))
                if t == last:
                    expected += float(scores[b])
            close(out[b, t], expected, 1e-12)
    assert torch.all(out[~mask] == 0)
    assert torch.equal(logp, logp_before) and torch.equal(ref, ref_before)
    # the per-row sum is score - β Σ k1 over the mask
    m = mask.to(F64)
    torch.testing.assert_close(out.sum(-1), scores - beta * ((logp - ref) * m).sum(-1), atol=1e-12, rtol=1e-12)


def test_kl_penalized_rewards_beta_zero_is_sparse_score():
    g = _gen(9)
    scores = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    logp = torch.randn(3, 4, generator=g, dtype=F64)
    ref = torch.randn(3, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    out = kl_penalized_rewards(scores, logp, ref, mask, 0.0)
    expected = torch.zeros(3, 4, dtype=F64)
    expected[0, 3], expected[1, 0], expected[2, 2] = 0.5, -1.0, 2.0
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


# --------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_hand_increase_clipped():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 12: error = 12/6 - 1 = 1 -> clipped to 0.2 ; β = 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    out = c.update(12.0, n_steps=256)
    close(out, 0.2 * (1 + 0.2 * 256 / 10000), 1e-12)
    close(out, 0.201024, 1e-12)
    assert c.value == out


def test_adaptive_kl_hand_unclipped_and_decrease():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 6.6: error = 0.1 (inside the clip) -> 0.2 * (1 + 0.1 * 256/10000) = 0.200512
    close(c.update(6.6, 256), 0.200512, 1e-12)
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 5.4: error = -0.1 -> 0.2 * (1 - 0.1 * 256/10000) = 0.199488
    close(c.update(5.4, 256), 0.199488, 1e-12)
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 0: error = -1 -> clipped to -0.2 -> 0.2 * (1 - 0.2 * 256/10000) = 0.198976
    close(c.update(0.0, 256), 0.198976, 1e-12)


def test_adaptive_kl_compounds_over_updates():
    c = AdaptiveKLController(0.1, target=2.0, horizon=1000)
    # e1 = clip(4/2 - 1) = 0.2 ; e2 = 3/2 - 1 = 0.5 -> 0.2 ; e3 = 1/2 - 1 = -0.5 -> -0.2 ; e4 = 2.2/2 - 1 = 0.1
    expected = 0.1
    for kl, e, n in [(4.0, 0.2, 100), (3.0, 0.2, 50), (1.0, -0.2, 200), (2.2, 0.1, 10)]:
        expected *= 1 + e * n / 1000
        close(c.update(kl, n), expected, 1e-12)
    close(c.value, 0.1 * 1.02 * 1.01 * 0.96 * 1.001, 1e-12)


def test_adaptive_kl_direction():
    c = AdaptiveKLController(0.3, target=5.0)
    assert c.update(4.0, 100) < 0.3  # below target: β decreases
    c = AdaptiveKLController(0.3, target=5.0)
    assert c.update(7.0, 100) > 0.3  # above target: β increases
    c = AdaptiveKLController(0.3, target=5.0)
    for _ in range(10):
        assert c.update(5.0, 512) == 0.3  # at target: unchanged
    c = AdaptiveKLController(0.3, target=5.0)
    assert c.update(100.0, 0) == 0.3  # zero samples: unchanged


@pytest.mark.parametrize("target", [0.0, -1.0])
def test_adaptive_kl_invalid_target(target):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=target)


@pytest.mark.parametrize("horizon", [0, -5])
def test_adaptive_kl_invalid_horizon(horizon):
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=horizon)


def test_adaptive_kl_state_dict_round_trip():
    c = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    c.update(12.0, 256)
    c.update(3.0, 128)
    state = c.state_dict()
    assert state == {"value": c.value, "target": 6.0, "horizon": 10000}
    d = AdaptiveKLController(0.9, target=6.0, horizon=10000)
    d.load_state_dict(state)
    assert d.value == c.value
    assert d.state_dict() == state
    # after restoring, both evolve identically
    assert d.update(9.0, 64) == c.update(9.0, 64)


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    assert c.value == 0.05
    for kl, n in [(0.0, 1), (100.0, 10000), (-3.0, 5)]:
        assert c.update(kl, n) == 0.05
    assert c.value == 0.05
    state = c.state_dict()
    assert state == {"value": 0.05}
    d = FixedKLController(1.0)
    d.load_state_dict(state)
    assert d.value == 0.05 and d.update(7.0, 3) == 0.05


# --------------------------------------------------------------------------- group baselines


def test_group_baseline_hand():
    r = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], dtype=F64)
    loo = group_baseline(r, "loo")
    assert torch.allclose(loo, torch.tensor([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]], dtype=F64), atol=1e-12)
    mean = group_baseline(r, "mean")
    assert torch.allclose(mean, torch.tensor([[3.0] * 3, [1.0] * 3], dtype=F64), atol=1e-12)
    adv = rloo_advantages(r)
    assert torch.allclose(adv, torch.tensor([[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]], dtype=F64), atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 8)])
def test_rloo_advantages_naive(shape):
    r = torch.randn(*shape, generator=_gen(3), dtype=F64)
    adv = rloo_advantages(r)
    for b in range(shape[0]):
        for i in range(shape[1]):
            others = [float(r[b, j]) for j in range(shape[1]) if j != i]
            close(adv[b, i], float(r[b, i]) - sum(others) / len(others))
    # each group's advantages sum to zero, and a constant per prompt changes nothing
    assert torch.allclose(adv.sum(dim=1), torch.zeros(shape[0], dtype=F64), atol=1e-12)
    shift = torch.randn(shape[0], 1, generator=_gen(4), dtype=F64)
    assert torch.allclose(rloo_advantages(r + shift), adv, atol=1e-12)


def test_group_baseline_errors():
    with pytest.raises(ValueError, match="at least 2"):
        group_baseline(torch.zeros(3, 1), "loo")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_baseline(torch.zeros(3), "loo")
    with pytest.raises(ValueError, match="unknown baseline"):
        group_baseline(torch.zeros(3, 2), "median")
