"""rm.trunk = frozen: linear reward heads on the SFT backbone's last-token states."""

from __future__ import annotations

import pytest
import torch

from tether.algorithms.reward import (
    collect_states,
    fit_linear_heads,
    fit_reward_model,
    group_accuracy,
    score_groups,
)
from tether.config import ConfigError, ModelConfig, RMConfig
from tether.data.schemas import parse_ranking

MODEL = ModelConfig(max_length=64, max_prompt_length=32)


def _planted(n: int, k: int = 4, d: int = 12, seed: int = 0, noise: float = 0.0):
    """Rankings (best first) of features whose true reward is linear in them; the features
    have large offsets and scales so that the returned weight must undo a standardisation."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g)
    scale = torch.rand(d, generator=g) * 20 + 0.1
    offset = torch.randn(d, generator=g) * 50
    z = torch.randn(n, k, d, generator=g)
    reward = z @ w_true + noise * torch.randn(n, k, generator=g)
    order = reward.argsort(dim=1, descending=True)
    x = (z * scale + offset).gather(1, order.unsqueeze(-1).expand(n, k, d))
    return x, torch.ones(n, k, dtype=torch.bool), (w_true, scale, offset)


def test_fit_linear_heads_recovers_a_planted_reward():
    x, mask, (w_true, scale, offset) = _planted(300)
    weight, info = fit_linear_heads(x, mask, heads=3, seed=1)
    assert weight.shape == (3, x.size(-1))
    assert info["rankings"] == 300 and info["folds"] == 5 and info["l2"] in (1e-3, 1e-2, 1e-1)
    # fresh draws from the same reward: raw features in, the standardisation is folded into the weight
    g = torch.Generator().manual_seed(9)
    z = torch.randn(500, x.size(-1), generator=g)
    true, got = z @ w_true, (z * scale + offset) @ weight.mean(dim=0)
    i, j = torch.triu_indices(500, 500, offset=1)
    agree = ((true[i] - true[j]) * (got[i] - got[j]) > 0).float().mean()
    assert agree > 0.9


def test_fit_linear_heads_is_seeded_and_bootstrap_separates_the_heads():
    x, mask, _ = _planted(80, noise=1.0)
    a, _ = fit_linear_heads(x, mask, heads=2, seed=3)
    b, _ = fit_linear_heads(x, mask, heads=2, seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], a[1])
    same, _ = fit_linear_heads(x, mask, heads=2, seed=3, bootstrap=False)
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


def test_cross_validation_prefers_strong_l2_on_noise_and_weak_l2_on_signal():
    """Rankings in random order carry no signal: the strongest L2 has the lowest
    cross-validated loss; a noiseless planted reward prefers the weakest."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, 30, generator=g)
    _, info = fit_linear_heads(x, torch.ones(200, 4, dtype=torch.bool), l2s=[1e-4, 1.0], steps=100, seed=0)
    assert info["l2"] == 1.0 and info["cv_loss"] == min(info["cv_loss_per_l2"].values())
    x, mask, _ = _planted(200)
    _, info = fit_linear_heads(x, mask, l2s=[1e-4, 1.0], steps=100, seed=0)
    assert info["l2"] == 1e-4


def test_too_few_rankings_for_cross_validation_take_the_middle_l2():
    x, mask, _ = _planted(3)
    w, info = fit_linear_heads(x, mask, l2s=[1e-3, 1e-2, 1e-1], steps=7, folds=5)
    assert info["folds"] == 0 and info["l2"] == 1e-2 and info["steps"] == 7
    assert torch.isfinite(w).all()


def test_rm_config_checks_head_fields():
    with pytest.raises(ConfigError, match="head_l2"):
        RMConfig(head_l2=[])
    with pytest.raises(ConfigError, match="head_folds"):
        RMConfig(head_folds=1)
    with pytest.raises(ConfigError, match="learning_curve"):
        RMConfig(learning_curve=[1])


def _rankings(n: int):
    """Rankings of 4 answers where the longer the answer, the better: a rule the head can learn."""
    out = []
    for i in range(n):
        answers = [" ".join(["word"] * (1 + j + i % 3)) for j in range(4)]
        out.append(parse_ranking({"prompt": f"question {i} " + "x " * (i % 5), "responses": answers,
                                  "ranking": [3, 2, 1, 0]}))
    return out


def test_grouped_states_equal_full_sequences(tiny_path, tiny_tokenizer):
    from tether.data.tokenize import Encoder
    from tether.models import load_scalar_model

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    model = load_scalar_model(tiny_path, MODEL, None, pad_token_id=enc.pad_id)
    rankings = _rankings(6)
    shared, m1 = collect_states(model, enc, rankings, share_prompt=True, batch_size=4)
    full, m2 = collect_states(model, enc, rankings, share_prompt=False, batch_size=4)
    assert shared.shape == (6, 4, model.config.hidden_size) and bool(m1.all()) and bool(m2.all())
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)


def test_fit_reward_model_writes_the_heads_and_reports_a_learning_curve(tiny_path, tiny_tokenizer):
    """The heads written into the model score held-out groups as the features did (up to a
    constant per head), and the learning curve ends at the reported held-out accuracy."""
    from tether.data.tokenize import Encoder
    from tether.models import load_scalar_model

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    model = load_scalar_model(tiny_path, MODEL, None, pad_token_id=enc.pad_id, num_labels=2)
    model.requires_grad_(False)
    before = {n: p.clone() for n, p in model.named_parameters() if "score" not in n}
    heldout = [{"prompt": f"held {i}", "responses": ["a", "a b c", "a b", "a b c d e"], "gold": [0.0, 0.5, 0.25, 1.0]}
               for i in range(6)]
    cfg = RMConfig(trunk="frozen", ensemble=2, learning_curve=[10, 20, 1000], head_steps=60)
    out = fit_reward_model(model, enc, _rankings(40), cfg, seed=0, heldout=heldout)
    assert out["trunk"] == "frozen" and out["heads"] == 2 and out["heldout_pairs"] == 36
    assert [c["rankings"] for c in out["learning_curve"]] == [10, 20, 40]
    assert out["learning_curve"][-1]["heldout_accuracy"] == out["heldout_accuracy"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "score" not in n)
    scores = score_groups(model, enc, [(g["prompt"], g["responses"]) for g in heldout])  # [24, 2]
    a, n = group_accuracy(scores.mean(dim=-1), [g["gold"] for g in heldout])
    assert n == 36 and a / n == pytest.approx(out["heldout_accuracy"])
    assert len(out["heldout_accuracy_per_head"]) == 2
