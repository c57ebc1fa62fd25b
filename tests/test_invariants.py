"""Engine invariants: gradient accumulation (4 micro-batches of 2) equals one batch of 8,
for SFT, the reward model and DPO, step by step over several optimiser steps."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from tether.algorithms.reward import train_reward
from tether.algorithms.sft import train_sft
from tether.config import ModelConfig, OptimConfig, RMConfig, SFTConfig
from tether.data.schemas import Demonstration, Ranking
from tether.data.tokenize import Encoder
from tether.models import load_policy, load_scalar_model
from tether.tasks import get_task

MODEL = ModelConfig(max_length=64, max_prompt_length=32)


def _max_weight_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _demos(n: int) -> list[Demonstration]:
    task = get_task("tiny")
    return [Demonstration(d["prompt"], d["response"]) for d in task.demonstrations(n, seed=3)]


def _rankings(n: int) -> list[Ranking]:
    task = get_task("tiny")
    demos = task.demonstrations(4 * n, seed=5)
    out = []
    for i in range(n):
        group = demos[4 * i : 4 * i + 4]
        prompt = group[0]["prompt"]
        responses = [d["response"] for d in group]
        gold = task.gold_batch([prompt] * 4, responses)
        out.append(Ranking(prompt, responses, sorted(range(4), key=lambda j: -gold[j])))
    return out


@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo"])
def test_grad_accumulation_4x2_equals_batch_of_8(tiny_path, tiny_tokenizer, trainer):
    torch.manual_seed(0)
    encoder = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    big = OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=8)
    accum = OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=2)
    if trainer == "sft":
        base = load_policy(tiny_path, MODEL)
        data = _demos(24)

        def run(model, optim):
            train_sft(model, encoder, data, SFTConfig(max_steps=3, optim=optim), seed=11)
    elif trainer == "rm":
        base = load_scalar_model(tiny_path, MODEL, pad_token_id=encoder.pad_id)
        data = _rankings(24)

        def run(model, optim):
            train_reward(model, encoder, data, RMConfig(max_steps=3, optim=optim), seed=11)
    else:
        from tether.algorithms.dpo import train_dpo
        from tether.config import DPOConfig
        from tether.models import frozen_copy

        base = load_policy(tiny_path, MODEL)
        data = _rankings(24)

        def run(model, optim):
            train_dpo(model, frozen_copy(model), encoder, data, DPOConfig(max_steps=3, optim=optim), seed=11)

    base = base.double()  # float64: the comparison is exact up to summation order (~1e-15)
    m_big, m_acc = copy.deepcopy(base), copy.deepcopy(base)
    run(m_big, big)
    run(m_acc, accum)
    moved = _max_weight_diff(base, m_big)
    assert moved > 1e-4, "training did not move the weights; the comparison would be vacuous"
    # Adam divides by sqrt(v): a near-zero gradient amplifies rounding, so compare in float64
    assert _max_weight_diff(m_big, m_acc) < 1e-9


def test_unweighted_accumulation_would_differ(tiny_path, tiny_tokenizer):
    """Guard for the test above: summing per-micro-batch *means* (the classic bug) differs."""
    from tether.algorithms.sft import collate_sft, sft_micro_loss

    encoder = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    model = load_policy(tiny_path, MODEL)
    demos = _demos(8)
    full = collate_sft(encoder, demos)
    micro = [collate_sft(encoder, demos[i : i + 2]) for i in range(0, 8, 2)]
    n_tokens = int(full["loss_mask"][:, 1:].sum())
    with torch.no_grad():
        exact = sum(float(sft_micro_loss(model, m, normalizer=n_tokens)) for m in micro)
        naive = sum(float(sft_micro_loss(model, m)) for m in micro) / 4
        whole = float(sft_micro_loss(model, full))
    assert abs(exact - whole) < 1e-5
    assert abs(naive - whole) > 1e-4


def test_training_inside_one_autocast_context_sees_every_step(tiny_path, tiny_tokenizer):
    """A whole stage runs inside one ``autocast_context``. Its forward passes must see the
    optimiser's updates: with autocast's weight-cast cache on, every forward reused the
    bf16 copy of the LoRA weights made at the first step, so the loss never moved and the
    saved adapters held gradients taken at the initial point (a model that collapsed)."""
    from tether.algorithms.sft import collate_sft, sft_micro_loss
    from tether.config import LoRAConfig
    from tether.models import autocast_context

    encoder = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    demos = _demos(8)
    batch = collate_sft(encoder, demos)
    n = float(batch["loss_mask"][:, 1:].sum())
    torch.manual_seed(0)
    model = load_policy(tiny_path, MODEL, LoRAConfig(enabled=True, r=4, alpha=8))
    per_step = copy.deepcopy(model)

    def train(m, one_context: bool) -> list[float]:
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        losses = []
        with autocast_context("bfloat16") if one_context else contextlib.nullcontext():
            for _ in range(3):
                with contextlib.nullcontext() if one_context else autocast_context("bfloat16"):
                    loss = sft_micro_loss(m, batch, normalizer=n)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss))
        return losses

    one = train(model, one_context=True)
    fresh = train(per_step, one_context=False)
    assert one[2] < one[0] - 1e-3  # the loss moves
    assert one == pytest.approx(fresh, abs=1e-4)


@pytest.mark.parametrize("trainer", ["sft", "rm", "dpo"])
def test_length_grouped_passes_equal_one_batch(tiny_path, tiny_tokenizer, trainer):
    """optim.micro_batch_tokens sorts a step's items by length and cuts them into several
    forward passes; the weights equal one pass of the whole batch in data order."""
    from tether.algorithms.reward import ranking_cost
    from tether.engine import length_groups

    torch.manual_seed(0)
    encoder = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    whole = OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=8, micro_batch_tokens=0)
    budget = 60 if trainer == "sft" else 200
    grouped = OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=8, micro_batch_tokens=budget)
    if trainer == "sft":
        base = load_policy(tiny_path, MODEL)
        data = _demos(24)

        def cost(i):
            p, (r,) = encoder.lengths(data[i].prompt, [data[i].response])
            return 1, p + r

        def run(model, optim):
            train_sft(model, encoder, data, SFTConfig(max_steps=3, optim=optim), seed=11)
    else:
        data = _rankings(24)
        cost = ranking_cost(encoder, data)
        if trainer == "rm":
            base = load_scalar_model(tiny_path, MODEL, pad_token_id=encoder.pad_id)

            def run(model, optim):
                train_reward(model, encoder, data, RMConfig(max_steps=3, optim=optim), seed=11)
        else:
            from tether.algorithms.dpo import train_dpo
            from tether.config import DPOConfig
            from tether.models import frozen_copy

            base = load_policy(tiny_path, MODEL)

            def run(model, optim):
                train_dpo(model, frozen_copy(model), encoder, data, DPOConfig(max_steps=3, optim=optim), seed=11)

    passes = length_groups([list(range(8))], cost, 8, budget)
    assert 2 <= len(passes) < 8, f"the budget should cut 8 items into a few passes, got {passes}"
    assert sorted(i for p in passes for i in p) == list(range(8))
    base = base.double()
    m_whole, m_grouped = copy.deepcopy(base), copy.deepcopy(base)
    run(m_whole, whole)
    run(m_grouped, grouped)
    assert _max_weight_diff(base, m_whole) > 1e-4
    assert _max_weight_diff(m_whole, m_grouped) < 1e-9
