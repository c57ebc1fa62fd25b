"""Held-out evaluation: the KL estimate from length-sorted, padding-trimmed chunks equals
the plain per-sample sum over the whole padded rollout."""

from __future__ import annotations

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
