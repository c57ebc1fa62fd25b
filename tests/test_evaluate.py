"""Held-out evaluation: the KL estimate from length-sorted, padding-trimmed chunks equals
the plain per-sample sum over the whole padded rollout."""

from __future__ import annotations

import math

import pytest
import torch

from tether.config import EvalConfig, GenerationConfig, ModelConfig
from tether.data.tokenize import Encoder
from tether.evaluate import evaluate_policy
from tether.models import load_policy, sequence_logprobs
from tether.rollout import generate
from tether.tasks import get_task

MODEL = ModelConfig(max_length=64, max_prompt_length=32)


def test_kl_to_reference_matches_a_naive_loop(tiny_path, tiny_tokenizer):
    torch.manual_seed(0)
    task = get_task("tiny")
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    reference = load_policy(tiny_path, MODEL, trainable=False)
    policy = load_policy(tiny_path, MODEL, trainable=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts = task.heldout_prompts()[:7]
    gen = GenerationConfig(max_new_tokens=8, batch_size=3, temperature=1.0)
    cfg = EvalConfig(n_prompts=7, samples_per_prompt=2, generation=gen)
    res = evaluate_policy(policy, enc, task, prompts, cfg, reference=reference, seed=5)

    rollout = generate(policy, enc, [p for p in prompts for _ in range(2)], gen, seed=5)
    with torch.no_grad():
        lp = sequence_logprobs(policy, rollout.input_ids, rollout.attention_mask, rollout.start)
        rp = sequence_logprobs(reference, rollout.input_ids, rollout.attention_mask, rollout.start)
    kls = [float(((a - b) * m).sum()) for a, b, m in zip(lp, rp, rollout.response_mask.float())]
    assert res["kl_to_ref"] == pytest.approx(sum(kls) / len(kls), abs=1e-4)
    assert res["n"] == 7 and res["n_samples"] == 14


def test_paired_difference_by_hand():
    from tether.evaluate import paired_difference

    a = [1.0, 0.5, 0.0, 1.0]
    b = [0.5, 0.5, 0.0, 0.5]
    res = paired_difference(a, b, seed=0)
    # d = [0.5, 0, 0, 0.5]: mean 0.25, sd = sqrt(4·0.0625 / 3) = 0.288675, se = 0.144338
    assert res["n"] == 4
    assert res["mean"] == pytest.approx(0.25, abs=1e-12)
    assert res["stderr"] == pytest.approx(0.1443375673, abs=1e-9)
    assert res["z"] == pytest.approx(0.25 / 0.1443375673, abs=1e-8)
    # unpaired: se(a) = sqrt(var([1, .5, 0, 1]) / 4) = sqrt(0.229167/4); se(b) = sqrt(0.0625/4)
    assert res["combined_stderr"] == pytest.approx(math.sqrt(0.2291666667 / 4 + 0.0625 / 4), abs=1e-9)
    lo, hi = res["ci95"]
    assert 0.0 <= lo <= 0.25 <= hi <= 0.5  # the bootstrap means of d lie in [min d, max d]


def test_paired_difference_beats_unpaired_when_prompts_share_difficulty():
    """Per-prompt difficulty that both policies share cancels in the paired s.e."""
    import random as _r

    from tether.evaluate import paired_difference

    rng = _r.Random(0)
    diff = [rng.random() for _ in range(400)]
    base = [d + rng.gauss(0, 0.05) for d in diff]
    better = [d + 0.02 + rng.gauss(0, 0.05) for d in diff]
    res = paired_difference(better, base)
    assert res["stderr"] < res["combined_stderr"] / 3
    assert res["z"] > 3 > res["z_combined"]


def test_paired_difference_needs_the_same_prompts():
    from tether.evaluate import paired_difference

    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0, 0.0], [1.0])


def test_group_pair_accuracy_counts_pairs_within_prompts_only():
    from tether.algorithms.ppo import _group_pair_accuracy

    # two prompts × 3 samples; gold ties are not compared; pairs across prompts never are
    scores = [0.9, 0.1, 0.5, 0.2, 0.3, 0.4]
    gold = [1.0, 0.0, 0.0, 1.0, 0.5, 0.0]
    # prompt 1: (0,1) ✓, (0,2) ✓, (1,2) tie → 2/2; prompt 2: (3,4) ✗, (3,5) ✗, (4,5) ✗ → 0/3
    assert _group_pair_accuracy(scores, gold, 3) == (2, 5)


def test_rm_accuracy_on_policy_pools_the_second_half(tmp_path):
    import json as _json

    from tether.pipeline import _rm_accuracy_on_policy

    rows = [{"step": 0, "reward/pair_accuracy": 0.8, "reward/pairs": 10},
            {"step": 1, "reward/pair_accuracy": 0.7, "reward/pairs": 10},
            {"step": 2, "reward/pair_accuracy": 0.5, "reward/pairs": 20},
            {"step": 3, "reward/pair_accuracy": 0.6, "reward/pairs": 20},
            {"step": 4, "loss/rm": 1.0}]
    (tmp_path / "m.jsonl").write_text("\n".join(_json.dumps(r) for r in rows) + "\n")
    res = _rm_accuracy_on_policy(tmp_path / "m.jsonl")
    assert res["sft_samples"]["accuracy"] == pytest.approx(0.8) and res["sft_samples"]["pairs"] == 10
    assert res["ppo_samples"]["accuracy"] == pytest.approx(0.55) and res["ppo_samples"]["pairs"] == 40
    assert res["ppo_samples"]["steps"] == [2, 3]
    assert res["ppo_samples"]["stderr"] == pytest.approx(math.sqrt(0.55 * 0.45 / 40))
    assert _rm_accuracy_on_policy(tmp_path / "missing.jsonl") is None
