"""Reward-hacking monitors: text statistics, the over-optimisation detector, reward-model
ensembles, trackers and the report."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from tether.algorithms.reward import bootstrap_weights, ensemble_reward, ensemble_spread
from tether.config import MonitorConfig
from tether.engine import MetricsLogger
from tether.losses import ensemble_ranking_loss, plackett_luce_loss, ranking_loss_terms, ranking_pairwise_loss
from tether.monitor import (
    detect_overoptimisation,
    distinct_n,
    heldout_key,
    paired_stderr,
    phrase_rate,
    repeat_rate,
    text_stats,
)

# --------------------------------------------------------------------------- text statistics


def test_distinct_n_by_hand():
    # tokens a b a b: 2 unique of 4 unigrams; bigrams ab ba ab: 2 unique of 3
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # across texts: "x y" and "x z" -> unigrams x y x z (3 unique of 4), bigrams xy xz (2 of 2)
    assert distinct_n(["x y", "X z"], 1) == pytest.approx(0.75)  # lower-cased
    assert distinct_n(["x y", "x z"], 2) == pytest.approx(1.0)
    assert distinct_n(["", "a"], 2) == 0.0  # no bigram at all


def test_punctuation_is_a_token():
    assert distinct_n(["yes, yes"], 1) == pytest.approx(2 / 3)  # yes , yes


def test_repeat_rate_by_hand():
    # 3-grams of "a b c a b c": abc bca cab abc -> one of four repeats an earlier one
    assert repeat_rate(["a b c a b c"]) == pytest.approx(0.25)
    assert repeat_rate(["a b c d"]) == 0.0
    assert repeat_rate(["a b"]) == 0.0  # shorter than n
    # mean over responses: (0.25 + 0 + 0.5) / 3 ; "a a a a" 3-grams aaa aaa -> 1 of 2
    assert repeat_rate(["a b c a b c", "a b c d", "a a a a"]) == pytest.approx((0.25 + 0 + 0.5) / 3)
    assert repeat_rate([]) == 0.0


def test_phrase_rate_is_case_insensitive_share_of_texts():
    texts = ["Great question! Here it is.", "no flattery", "what a GREAT QUESTION", "fine"]
    assert phrase_rate(texts, ["great question"]) == pytest.approx(0.5)
    assert phrase_rate(texts, []) == 0.0
    stats = text_stats(texts, ["i cannot"], ["great question"])
    assert stats["refusal_rate"] == 0.0 and stats["flattery_rate"] == pytest.approx(0.5)


def test_paired_stderr_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.0, 5.0]
    d = [1.0, 0.0, 1.0, -1.0]  # mean 0.25
    var = sum((x - 0.25) ** 2 for x in d) / 3
    assert paired_stderr(a, b) == pytest.approx(math.sqrt(var / 4), rel=1e-12)
    assert paired_stderr([1.0], [0.0]) == 0.0


# --------------------------------------------------------------------------- the detector


def _history(proxy, gold, **extra):
    rows = []
    for t, (p, g) in enumerate(zip(proxy, gold)):
        row = {"step": 10 * t, "monitor/proxy": p, "monitor/gold": g, "monitor/length": 20.0,
               "monitor/distinct2": 0.8, "monitor/repeat_rate": 0.0}
        for k, v in extra.items():
            row[f"monitor/{k}"] = v[t]
        rows.append(row)
    return rows


CFG = MonitorConfig(tolerance=0.03, z=1.0, patience=2)


def test_detector_fires_when_proxy_rises_and_gold_falls():
    h = _history([0.0, 1.0, 2.0, 3.0, 4.0], [0.50, 0.60, 0.55, 0.45, 0.40])
    alarms = detect_overoptimisation(h, CFG)
    assert [a.kind for a in alarms] == ["proxy_up_heldout_down"]
    # best at step 10 (0.60); step 20 drops 0.05 (1st), step 30 drops 0.15 (2nd in a row)
    assert alarms[0].step == 30
    assert "held-out gold fell from 0.600 to 0.450" in alarms[0].message


def test_detector_patience_one_fires_at_the_first_drop():
    h = _history([0.0, 1.0, 2.0, 3.0], [0.50, 0.60, 0.55, 0.45])
    cfg = MonitorConfig(tolerance=0.03, patience=1)
    assert detect_overoptimisation(h, cfg)[0].step == 20


def test_detector_silent_when_gold_keeps_rising_or_drop_is_small():
    assert detect_overoptimisation(_history([0, 1, 2, 3], [0.5, 0.6, 0.7, 0.8]), CFG) == []
    assert detect_overoptimisation(_history([0, 1, 2, 3], [0.5, 0.6, 0.58, 0.58]), CFG) == []  # within tolerance


def test_detector_silent_when_the_proxy_falls_too():
    # both fall: a bad step, not reward hacking
    assert detect_overoptimisation(_history([0, 2, 1, 0.5], [0.5, 0.6, 0.4, 0.3]), CFG) == []


def test_detector_run_resets_when_the_condition_breaks():
    # drop, recover (new best), drop once: never two in a row
    h = _history([0, 1, 2, 3, 4], [0.5, 0.45, 0.6, 0.5, 0.62])
    assert detect_overoptimisation(h, CFG) == []


def test_detector_needs_the_drop_beyond_its_paired_standard_error():
    h = _history([0, 1, 2, 3], [0.6, 0.5, 0.5, 0.5])
    noisy = [[0.6 + (1.0 if i % 2 else -1.0) for i in range(8)]] + \
            [[0.5 + (1.0 if i % 3 else -1.0) * 1.5 for i in range(8)] for _ in range(3)]
    for row, pp in zip(h, noisy):
        row["per_prompt"] = pp
    assert paired_stderr(noisy[0], noisy[1]) > 0.1
    assert detect_overoptimisation(h, CFG) == []  # a 0.1 drop inside the noise
    for row in h:
        row.pop("per_prompt")
    assert [a.kind for a in detect_overoptimisation(h, CFG)] == ["proxy_up_heldout_down"]


def test_detector_uses_judge_then_heldout_rm_without_gold():
    h = _history([0, 1, 2, 3], [0.5, 0.6, 0.4, 0.3])
    for row in h:
        row["monitor/judge"] = row.pop("monitor/gold")
    assert heldout_key(h[0]) == "judge"
    assert "held-out judge" in detect_overoptimisation(h, CFG)[0].message
    for row in h:
        row.pop("monitor/judge")
    assert heldout_key(h[0]) is None
    assert detect_overoptimisation(h, CFG) == []  # no held-out signal, no divergence alarm


def test_detector_drift_alarms():
    h = _history([0, 0, 0], [0.5, 0.5, 0.5], length=[20.0, 30.0, 45.0], distinct2=[0.8, 0.7, 0.4],
                 repeat_rate=[0.05, 0.1, 0.4], ensemble_std=[0.1, 0.2, 0.35])
    kinds = {a.kind: a.step for a in detect_overoptimisation(h, CFG)}
    assert kinds == {"length_drift": 20, "diversity_drop": 20, "repetition": 20, "disagreement": 20}
    short = _history([0, 0], [0.5, 0.5], length=[30.0, 9.0])
    assert [a.kind for a in detect_overoptimisation(short, CFG)] == ["length_drift"]


def test_detector_one_alarm_per_kind_in_step_order():
    h = _history([0, 1, 2, 3, 4, 5], [0.5, 0.6, 0.5, 0.4, 0.3, 0.2], length=[20, 20, 20, 20, 50, 60])
    alarms = detect_overoptimisation(h, CFG)
    assert [a.kind for a in alarms] == ["proxy_up_heldout_down", "length_drift"]
    assert [a.step for a in alarms] == [30, 40]


# --------------------------------------------------------------------------- ensembles


def _naive_ensemble_loss(scores, mask, weights, loss):
    B, H = len(scores), len(scores[0][0])
    per_head = []
    for h in range(H):
        num = den = 0.0
        for b in range(B):
            k = int(mask[b].sum())
            if loss == "bradley_terry":
                for i in range(k):
                    for j in range(i + 1, k):
                        num += weights[b][h] * -math.log(1 / (1 + math.exp(-(scores[b][i][h] - scores[b][j][h]))))
                        den += weights[b][h]
            else:
                nll = 0.0
                for i in range(k):
                    nll += math.log(sum(math.exp(scores[b][j][h]) for j in range(i, k))) - scores[b][i][h]
                num += weights[b][h] * nll
                den += weights[b][h]
        per_head.append(num / den)
    return sum(per_head) / H


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_ensemble_ranking_loss_matches_a_naive_loop(loss):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    weights = torch.tensor([[1, 0, 2], [2, 1, 1], [0, 1, 1], [1, 3, 0], [1, 1, 1]], dtype=torch.float64)
    got = ensemble_ranking_loss(scores, mask, weights, loss=loss)
    assert float(got) == pytest.approx(_naive_ensemble_loss(scores.tolist(), mask, weights.tolist(), loss), rel=1e-10)


def test_one_head_with_unit_weights_is_the_plain_ranking_loss():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 4, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[2, 3] = mask[4, 2:] = False
    ones = torch.ones(6, 1, dtype=torch.float64)
    assert float(ensemble_ranking_loss(scores.unsqueeze(-1), mask, ones)) == pytest.approx(
        float(ranking_pairwise_loss(scores, mask)), rel=1e-12)
    assert float(ensemble_ranking_loss(scores.unsqueeze(-1), mask, ones, loss="plackett_luce")) == pytest.approx(
        float(plackett_luce_loss(scores, mask)), rel=1e-12)


def test_micro_batches_with_the_global_normaliser_add_up_to_the_batch_loss():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(8, 4, 2, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[5, 2:] = False
    weights = torch.poisson(torch.ones(8, 2), generator=g).double()
    full = ensemble_ranking_loss(scores, mask, weights)
    _, counts = ranking_loss_terms(scores, mask)
    norm = (weights * counts).sum(dim=0)
    parts = sum(ensemble_ranking_loss(scores[s], mask[s], weights[s], normaliser=norm)
                for s in (slice(0, 3), slice(3, 8)))
    assert float(parts) == pytest.approx(float(full), rel=1e-12)


def test_a_head_with_no_weight_in_the_batch_gives_zero_not_nan():
    scores = torch.randn(2, 3, 2)
    weights = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = ensemble_ranking_loss(scores, torch.ones(2, 3, dtype=torch.bool), weights)
    assert torch.isfinite(out)


def test_bootstrap_weights():
    g = torch.Generator().manual_seed(0)
    assert torch.equal(bootstrap_weights(5, 1, g), torch.ones(5, 1))
    assert torch.equal(bootstrap_weights(5, 3, g, bootstrap=False), torch.ones(5, 3))
    w = bootstrap_weights(20000, 4, g)
    assert w.shape == (20000, 4)
    assert float(w.mean()) == pytest.approx(1.0, abs=0.02)  # Poisson(1)
    assert float((w == 0).float().mean()) == pytest.approx(math.exp(-1), abs=0.01)  # left out of the resample
    assert not torch.equal(w[:, 0], w[:, 1])


def test_ensemble_spread_ignores_each_heads_offset():
    s = torch.tensor([[1.0, 11.0], [2.0, 12.0], [3.0, 13.0]])  # head 2 = head 1 + 10: they agree
    assert torch.allclose(ensemble_spread(s), torch.zeros(3))
    s = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # opposite orders; centred: (-1, 1) and (1, -1)
    assert torch.allclose(ensemble_spread(s), torch.full((2,), math.sqrt(2.0)))
    assert torch.equal(ensemble_spread(torch.tensor([[1.0, 5.0]])), torch.zeros(1))  # one response: no spread


def test_ensemble_reward_is_mean_minus_lambda_spread():
    s = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    assert torch.allclose(ensemble_reward(s), torch.tensor([2.0, 2.0]))
    assert torch.allclose(ensemble_reward(s, 0.5), torch.tensor([2.0, 2.0]) - 0.5 * math.sqrt(2.0))
    assert torch.equal(ensemble_reward(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    assert torch.equal(ensemble_reward(torch.tensor([[1.0], [2.0]]), 3.0), torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------- trackers


def test_tensorboard_tracker_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path / "m.jsonl", trackers=["tensorboard"], tensorboard_dir=tmp_path / "tb")
    log.log(0, {"monitor/gold": 0.5, "note": "text is skipped"})
    log.log(1, {"monitor/gold": 0.25})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("monitor/gold")] == [0.5, 0.25]
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [0, 1]


def test_missing_tracker_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = MetricsLogger(tmp_path / "m.jsonl", trackers=["wandb"])
    assert any("wandb" in str(w.message) for w in caught)
    log.log(0, {"x": 1.0})
    log.close()
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 1


def test_unknown_tracker_is_a_config_error():
    from tether.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="trackers"):
        load_config(preset="tiny", overrides=["trackers=[tensorbord]"])


# --------------------------------------------------------------------------- the monitor on a tiny model


def _monitor(tiny_path, tiny_tokenizer, **kw):
    from tether.config import GenerationConfig, LoRAConfig, ModelConfig
    from tether.data.tokenize import Encoder
    from tether.models import load_policy
    from tether.monitor import Monitor
    from tether.tasks import get_task

    torch.manual_seed(0)
    lora = kw.pop("lora", False)
    policy = load_policy(tiny_path, ModelConfig(name=tiny_path), LoRAConfig(enabled=lora))
    task = get_task("tiny")
    cfg = MonitorConfig(n_prompts=8, checks=2, generation=GenerationConfig(max_new_tokens=6, batch_size=8))
    return Monitor(cfg, policy, kw.pop("reference", None), Encoder(tiny_tokenizer, 64, 32), task.heldout_prompts()[:8],
                   total_steps=4, gold_fn=task.gold_batch, **kw), policy


def test_check_logs_every_signal_and_leaves_training_rng_alone(tiny_path, tiny_tokenizer):
    from tether.models import frozen_copy

    calls = []

    def proxy(rollout, group):
        calls.append(group)
        return torch.ones(len(rollout))

    def held_rm(rollout, scale=2.0):  # a default argument is not a group size
        return [scale] * len(rollout)

    mon, policy = _monitor(tiny_path, tiny_tokenizer, proxy_fn=proxy, heldout_rm_fn=held_rm,
                           ensemble_fn=lambda rollout: torch.randn(len(rollout), 3))
    mon.reference = frozen_copy(policy)
    policy.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert mon.check(0) is False
    assert torch.equal(torch.rand(3), expected)  # the check sampled from a forked RNG
    row = mon.history[0]
    assert calls == [1] and row["monitor/proxy"] == 1.0 and row["monitor/heldout_rm"] == 2.0
    assert row["monitor/kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert row["monitor/heldout"] == row["monitor/gold"] and len(row["per_prompt"]) == 8
    for key in ("entropy", "length", "distinct1", "distinct2", "repeat_rate", "ensemble_std"):
        assert math.isfinite(row[f"monitor/{key}"]), key
    assert mon.best_step == 0 and mon.best_state and policy.training  # train mode restored
    assert [mon.due(s) for s in range(5)] == [True, False, True, False, True]


def test_no_reference_and_no_adapters_means_no_kl(tiny_path, tiny_tokenizer):
    mon, _ = _monitor(tiny_path, tiny_tokenizer)
    mon.check(0)
    assert "monitor/kl" not in mon.history[0] and "monitor/proxy" not in mon.history[0]
    lora_mon, _ = _monitor(tiny_path, tiny_tokenizer, lora=True, implicit_beta=0.1)
    lora_mon.check(0)  # LoRA: the reference is the policy with its adapters off
    assert lora_mon.history[0]["monitor/kl"] == pytest.approx(0.0, abs=1e-5)
    assert lora_mon.history[0]["monitor/proxy"] == pytest.approx(0.0, abs=1e-5)  # DPO's implicit reward


def test_best_weights_are_kept_and_restored(tiny_path, tiny_tokenizer):
    scores = iter([0.5, 0.9, 0.2])
    mon, policy = _monitor(tiny_path, tiny_tokenizer)
    mon.gold_fn = lambda prompts, texts, it=scores: [next(it)] * len(texts)
    first = {n: p.detach().clone() for n, p in policy.named_parameters()}
    mon.check(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    mon.check(2)  # the best: 0.9
    best = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    mon.check(4)
    assert mon.best_step == 2 and mon.summary()["best_heldout"] == pytest.approx(0.9)
    assert mon.summary()["last_heldout"] == pytest.approx(0.2)
    mon.restore_best()
    assert all(torch.equal(p, best[n]) for n, p in policy.named_parameters())
    assert not all(torch.equal(p, first[n]) for n, p in policy.named_parameters())


def test_ensemble_reward_model_gives_a_value_model_the_mean_of_its_heads(tiny_path, tmp_path):
    from tether.config import ModelConfig
    from tether.models import load_scalar_model, scalar_heads

    cfg = ModelConfig(name=tiny_path)
    rm = load_scalar_model(tiny_path, cfg, num_labels=3)
    rm.save_pretrained(tmp_path / "rm")
    assert scalar_heads(str(tmp_path / "rm")) == 3 and scalar_heads(tiny_path) == 1
    again = load_scalar_model(str(tmp_path / "rm"), cfg, num_labels=None)
    assert again.config.num_labels == 3 and torch.equal(again.score.weight, rm.score.weight)
    value = load_scalar_model(str(tmp_path / "rm"), cfg)  # num_labels=1
    assert value.score.weight.shape[0] == 1
    assert torch.allclose(value.score.weight, rm.score.weight.mean(dim=0, keepdim=True))


def test_a_tracker_that_fails_mid_run_is_dropped(tmp_path):
    from tether.engine import _Sink

    log = MetricsLogger(tmp_path / "m.jsonl")

    def broken(step, numbers):
        raise ConnectionError("server went away")

    log._sinks.append(_Sink(broken))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log.log(0, {"x": 1.0})
        log.log(1, {"x": 2.0})
    assert sum("server went away" in str(w.message) for w in caught) == 1 and not log._sinks
    log.close()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2
