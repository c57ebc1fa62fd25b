"""The DPO family, GRPO's loss and group advantages: hand-computed values and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from tether.advantages import grpo_advantages, rloo_advantages
from tether.losses import DPO_VARIANTS, dpo_loss, grpo_policy_loss, orpo_loss, simpo_loss

F64 = torch.float64


def t(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


def softplus(x: float) -> float:
    """log(1 + e^x) = −log σ(−x)."""
    return math.log1p(math.exp(x)) if x < 0 else x + math.log1p(math.exp(-x))


def close(a, b, tol=1e-12):
    a = float(a.detach()) if torch.is_tensor(a) else float(a)
    assert math.isclose(a, float(b), rel_tol=tol, abs_tol=tol), (a, float(b))


# --------------------------------------------------------------------------- dpo_loss

# one pair: policy chosen −1, rejected −2; reference −1.5 for both, so h = 0.5 − (−0.5) = 1
ONE = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))


def test_dpo_sigmoid_hand():
    loss, m = dpo_loss(*ONE, beta=0.1)
    close(loss, softplus(-0.1))  # −log σ(β h) = log(1 + e^{−0.1}) = 0.64439666...
    close(loss, 0.6443966600735709)
    close(m["rewards/chosen"], 0.05)
    close(m["rewards/rejected"], -0.05)
    close(m["rewards/margin"], 0.1)
    close(m["rewards/accuracy"], 1.0)
    close(m["logps/chosen"], -1.0)
    close(m["logps/rejected"], -2.0)


def test_cdpo_label_smoothing_hand():
    loss, _ = dpo_loss(*ONE, beta=0.1, label_smoothing=0.2)
    # 0.8·log(1+e^{−0.1}) + 0.2·log(1+e^{0.1}) and log(1+e^{0.1}) = log(1+e^{−0.1}) + 0.1
    close(loss, 0.6443966600735709 + 0.2 * 0.1)


def test_ipo_hand():
    loss, _ = dpo_loss(*ONE, beta=0.1, variant="ipo")
    close(loss, (1.0 - 1.0 / 0.2) ** 2)  # 16
    close(loss, 16.0)
    # at the IPO target h = 1/(2β) the loss and its gradient are zero
    pc = t(3.0).requires_grad_()
    loss, _ = dpo_loss(pc, t(-2.0), t(0.0), t(0.0), beta=0.1, variant="ipo")
    loss.backward()
    close(loss, 0.0)
    close(pc.grad, 0.0)


def test_hinge_hand():
    loss, _ = dpo_loss(*ONE, beta=0.1, variant="hinge")
    close(loss, 0.9)
    loss, _ = dpo_loss(t(20.0), t(0.0), t(0.0), t(0.0), beta=0.1, variant="hinge")
    close(loss, 0.0)  # β·h = 2 ≥ 1: no loss


def _naive_dpo(pc, pr, rc, rr, beta, variant, eps):
    total = 0.0
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        if variant == "sigmoid":
            total += (1 - eps) * softplus(-beta * h) + eps * softplus(beta * h)
        elif variant == "ipo":
            total += (h - 1 / (2 * beta)) ** 2
        else:
            total += max(0.0, 1 - beta * h)
    return total / len(pc)


@pytest.mark.parametrize("variant", sorted(DPO_VARIANTS))
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_matches_naive_loop(variant, beta):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-10 * torch.rand(9, generator=g, dtype=F64) for _ in range(4))
    eps = 0.1 if variant == "sigmoid" else 0.0
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, variant=variant, label_smoothing=eps)
    close(loss, _naive_dpo(pc, pr, rc, rr, beta, variant, eps), 1e-10)
    acc = sum(bool((pc[i] - rc[i]) > (pr[i] - rr[i])) for i in range(9)) / 9
    close(m["rewards/accuracy"], float(acc))


def test_dpo_gradient_pushes_chosen_up_rejected_down():
    pc, pr = t(-3.0, -1.0).requires_grad_(), t(-2.0, -4.0).requires_grad_()
    loss, _ = dpo_loss(pc, pr, t(-2.5, -2.0), t(-2.5, -3.0), beta=0.1)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dpc of −log σ(β h) is −β σ(−β h) / B
    h0 = (-3.0 + 2.5) - (-2.0 + 2.5)
    close(pc.grad[0], -0.1 * (1 / (1 + math.exp(0.1 * h0))) / 2, 1e-12)


def test_dpo_bad_arguments():
    with pytest.raises(ValueError, match="unknown DPO variant"):
        dpo_loss(*ONE, variant="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*ONE, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid variant only"):
        dpo_loss(*ONE, variant="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*ONE, beta=0.0)


# --------------------------------------------------------------------------- simpo / orpo


def test_simpo_hand():
    # r_w = 2·(−4)/2 = −4, r_l = 2·(−9)/3 = −6, z = −4 + 6 − 1 = 1
    loss, m = simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=1.0)
    close(loss, math.log1p(math.exp(-1.0)))
    close(loss, 0.31326168751822286)
    close(m["rewards/margin"], 2.0)
    loss, _ = simpo_loss(t(-4.0), t(-9.0), t(2.0), t(3.0), beta=2.0, gamma=1.0, label_smoothing=0.25)
    close(loss, 0.75 * softplus(-1.0) + 0.25 * softplus(1.0))


def test_simpo_matches_naive_loop():
    g = torch.Generator().manual_seed(5)
    pc, pr = -20 * torch.rand(7, generator=g, dtype=F64), -20 * torch.rand(7, generator=g, dtype=F64)
    lc, lr = torch.randint(1, 30, (7,), generator=g), torch.randint(1, 30, (7,), generator=g)
    loss, _ = simpo_loss(pc, pr, lc, lr, beta=2.5, gamma=0.7)
    naive = sum(softplus(-(2.5 * float(pc[i]) / int(lc[i]) - 2.5 * float(pr[i]) / int(lr[i]) - 0.7))
                for i in range(7)) / 7
    close(loss, naive, 1e-10)


def test_orpo_hand():
    # chosen: −2 over 4 tokens → mean log-prob −0.5; rejected: −3 over 2 → −1.5
    def log_odds(a):
        p = math.exp(a)
        return math.log(p / (1 - p))

    ratio = log_odds(-0.5) - log_odds(-1.5)
    close(ratio, 0.4327521295671885 + 1.247517541074546, 1e-12)
    loss, m = orpo_loss(t(-2.0), t(-3.0), t(4.0), t(2.0), lam=0.1)
    close(loss, 0.5 + 0.1 * softplus(-ratio), 1e-10)
    close(m["loss/sft"], 0.5)
    close(m["log_odds_ratio"], ratio, 1e-10)


def test_orpo_finite_near_probability_one():
    loss, _ = orpo_loss(t(0.0), t(-1.0), t(3.0), t(3.0))  # P(chosen) = 1: odds clamped, not inf
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- advantages


def _naive_grpo(rewards: list[list[float]], scale: str, eps: float) -> list[list[float]]:
    flat = [x for row in rewards for x in row]
    mu_all = sum(flat) / len(flat)
    sd_all = math.sqrt(sum((x - mu_all) ** 2 for x in flat) / (len(flat) - 1))
    out = []
    for row in rewards:
        mu = sum(row) / len(row)
        sd = math.sqrt(sum((x - mu) ** 2 for x in row) / (len(row) - 1))
        div = {"group": sd + eps, "batch": sd_all + eps, "none": 1.0}[scale]
        out.append([(x - mu) / div if max(row) != min(row) else 0.0 for x in row])
    return out


def test_grpo_advantages_hand():
    a = grpo_advantages(t(1.0, 2.0, 3.0).unsqueeze(0))  # mean 2, sample std 1
    assert torch.allclose(a, t(-1.0, 0.0, 1.0).unsqueeze(0) / (1 + 1e-4), atol=0, rtol=1e-14)
    r = torch.tensor([[1.0, 3.0], [5.0, 5.0]], dtype=F64)
    b = grpo_advantages(r, scale="batch")  # batch std of 1,3,5,5 = sqrt(11/3)
    assert torch.allclose(b, torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=F64) / (math.sqrt(11 / 3) + 1e-4))
    n = grpo_advantages(r, scale="none")
    assert torch.equal(n, torch.tensor([[-1.0, 1.0], [0.0, 0.0]], dtype=F64))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_naive_loop(scale):
    g = torch.Generator().manual_seed(11)
    r = torch.rand(6, 5, generator=g, dtype=F64)
    r[2] = 0.7  # one flat group
    got = grpo_advantages(r, scale=scale, eps=1e-3)
    want = torch.tensor(_naive_grpo(r.tolist(), scale, 1e-3), dtype=F64)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_zero_spread_group_gives_zero_not_nan(scale):
    r = torch.full((3, 4), 0.1, dtype=torch.float32)  # 0.1 is not exact in binary: the mean rounds
    a = grpo_advantages(r, scale=scale)
    assert torch.equal(a, torch.zeros_like(a))
    assert torch.equal(rloo_advantages(r), torch.zeros_like(r)) or rloo_advantages(r).abs().max() < 1e-7


def test_grpo_advantages_errors():
    with pytest.raises(ValueError, match="at least 2"):
        grpo_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        grpo_advantages(torch.ones(3))
    with pytest.raises(ValueError, match="unknown scale"):
        grpo_advantages(torch.ones(2, 2), scale="max")


def test_rloo_matches_naive_loop():
    r = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], dtype=F64)
    want = [[x - (sum(row) - x) / (len(row) - 1) for x in row] for row in r.tolist()]
    assert torch.allclose(rloo_advantages(r), torch.tensor(want, dtype=F64))
    close(rloo_advantages(r)[0, 2], 6.0 - 1.5)


# --------------------------------------------------------------------------- grpo_policy_loss


def test_grpo_loss_on_policy_is_minus_advantage():
    lp = t(-1.0, -2.0, -3.0).unsqueeze(0)
    mask = torch.tensor([[1, 1, 0]])
    loss, s = grpo_policy_loss(lp, lp.clone(), t(0.5), mask)
    close(loss, -0.5)
    close(s["clipfrac"], 0.0)


def test_grpo_loss_k3_hand():
    lp = t(-1.0, -1.0).unsqueeze(0)
    ref = lp + math.log(2.0)  # ref − logπ = log 2: k3 = 2 − log 2 − 1
    loss, s = grpo_policy_loss(lp, lp.clone(), t(0.0), torch.ones(1, 2), ref_logprobs=ref, beta=0.04)
    close(loss, 0.04 * (1 - math.log(2.0)))
    close(s["kl_ref"], 1 - math.log(2.0))


def _naive_grpo_loss(lp, old, adv, mask, clip, ref, beta, aggregation):
    rows = []
    for b in range(lp.size(0)):
        terms = []
        for t_ in range(lp.size(1)):
            if not mask[b, t_]:
                continue
            rho = math.exp(float(lp[b, t_] - old[b, t_]))
            a = float(adv[b])
            term = max(-a * rho, -a * min(max(rho, 1 - clip), 1 + clip))
            d = float(ref[b, t_] - lp[b, t_])
            terms.append(term + beta * (math.exp(d) - d - 1))
        rows.append(terms)
    if aggregation == "token":
        flat = [x for r in rows for x in r]
        return sum(flat) / len(flat)
    return sum(sum(r) / len(r) for r in rows) / len(rows)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_grpo_loss_matches_naive_loop(aggregation):
    g = torch.Generator().manual_seed(2)
    lp = -3 * torch.rand(4, 6, generator=g, dtype=F64)
    old = lp + 0.4 * (torch.rand(4, 6, generator=g, dtype=F64) - 0.5)
    ref = lp + 0.6 * (torch.rand(4, 6, generator=g, dtype=F64) - 0.5)
    adv = torch.randn(4, generator=g, dtype=F64)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, n in enumerate([6, 1, 3, 5]):
        mask[b, :n] = True
    loss, _ = grpo_policy_loss(lp, old, adv, mask, clip=0.1, ref_logprobs=ref, beta=0.05, aggregation=aggregation)
    close(loss, _naive_grpo_loss(lp, old, adv, mask, 0.1, ref, 0.05, aggregation), 1e-10)


def test_grpo_loss_errors():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), beta=0.1)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 2), aggregation="mean")
