"""DPO and GRPO/RLOO on the tiny model: ranking log-probs, the reference cache, reward specs,
the stage plan, and short training runs that must move the policy the right way."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from tether.algorithms.dpo import cache_key, preference_loss, ranking_logps, reference_logps, train_dpo
from tether.algorithms.reward import collate_rankings
from tether.config import ConfigError, DPOConfig, GRPOConfig, LoRAConfig, ModelConfig, OptimConfig, load_config
from tether.data.schemas import Ranking
from tether.data.tokenize import Encoder
from tether.losses import dpo_loss
from tether.models import load_policy, sequence_logprobs
from tether.rewards import combine_rewards, load_callable, parse_reward_spec

MODEL = ModelConfig(max_length=64, max_prompt_length=32, autocast="off")
LORA = LoRAConfig(enabled=True, r=4, alpha=8)


def _enc(tok) -> Encoder:
    return Encoder(tok, MODEL.max_length, MODEL.max_prompt_length)


def _rankings() -> list[Ranking]:
    return [
        Ranking("write three words about fruits", ["apple fig plum", "apple", "red dog cat", "fig fig fig"], [0, 1, 3, 2]),
        Ranking("write two words about tools", ["saw drill", "saw", "blue", "drill drill axe"], [0, 3, 1, 2]),
        Ranking("write one word about colors", ["red", "pink blue", "dog", "red red"], [0, 1, 3, 2]),
    ]


def _whole_row_logp(model, enc, prompt, response) -> float:
    p, r = enc.example(prompt, response)
    ids = torch.tensor([p + r])
    return float(sequence_logprobs(model, ids, torch.ones_like(ids), len(p)).sum())


# --------------------------------------------------------------------------- ranking log-probs


@pytest.mark.parametrize("share", [True, False])
def test_ranking_logps_equal_whole_rows(tiny_path, tiny_tokenizer, share):
    enc = _enc(tiny_tokenizer)
    model = load_policy(tiny_path, MODEL).double().eval()
    rankings = _rankings()
    rankings.append(Ranking("write two words about animals", ["cat dog", "fox"], [1, 0]))  # K = 2 among K = 4
    batch = collate_rankings(enc, rankings, share, split=True)
    assert int(batch["group"]) == 1  # unequal K: each row its own query
    with torch.no_grad():
        logps, lengths = ranking_logps(model, batch)
        for b, r in enumerate(rankings):
            for k, response in enumerate(r.ranked()):
                want = _whole_row_logp(model, enc, r.prompt, response)
                assert math.isclose(float(logps[b, k]), want, rel_tol=1e-10, abs_tol=1e-10)
                assert int(lengths[b, k]) == len(enc.example(r.prompt, response)[1])
        assert float(logps[-1, 2:].abs().sum()) == 0.0  # padded slots
    even = collate_rankings(enc, _rankings(), share, split=True)
    assert int(even["group"]) == (4 if share else 1)
    with torch.no_grad():
        shared, _ = ranking_logps(model, even)
        assert torch.allclose(shared, logps[:3], rtol=1e-10, atol=1e-10)


def test_preference_loss_over_a_ranking_is_the_mean_over_its_pairs():
    g = torch.Generator().manual_seed(0)
    pol, ref = -5 * torch.rand(2, 3, generator=g, dtype=torch.float64), -5 * torch.rand(2, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([[3.0, 4.0, 5.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    for loss_name in ("sigmoid", "ipo", "hinge", "simpo", "orpo"):
        cfg = DPOConfig(loss=loss_name, beta=0.3 if loss_name != "simpo" else 2.0)
        got, metrics = preference_loss(cfg, pol, lengths, ref, mask)
        pairs = [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 1)]  # (row, better, worse)
        terms = []
        for b, i, j in pairs:
            one = DPOConfig(loss=loss_name, beta=cfg.beta)
            single, _ = preference_loss(one, pol[b, [i, j]].unsqueeze(0), lengths[b, [i, j]].unsqueeze(0),
                                        ref[b, [i, j]].unsqueeze(0), torch.ones(1, 2, dtype=torch.bool))
            terms.append(float(single))
        assert math.isclose(float(got), sum(terms) / 4, rel_tol=1e-12), loss_name
    # and the sigmoid loss of one pair is dpo_loss of it
    single, _ = dpo_loss(pol[0, :1], pol[0, 1:2], ref[0, :1], ref[0, 1:2], beta=0.3)
    got, _ = preference_loss(DPOConfig(beta=0.3), pol[:1, :2], lengths[:1, :2], ref[:1, :2], mask[:1, :2])
    assert math.isclose(float(got), float(single), rel_tol=1e-12)


# --------------------------------------------------------------------------- the reference


def test_lora_reference_is_the_model_without_adapters(tiny_path, tiny_tokenizer):
    enc = _enc(tiny_tokenizer)
    policy = load_policy(tiny_path, MODEL, LORA)
    with torch.no_grad():  # make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    plain = load_policy(tiny_path, MODEL).eval()
    ref = reference_logps(policy, None, enc, _rankings(), batch_size=2)
    with torch.no_grad():
        want, _ = ranking_logps(plain, collate_rankings(enc, _rankings(), split=True))
        with_adapters, _ = ranking_logps(policy.eval(), collate_rankings(enc, _rankings(), split=True))
    assert torch.allclose(ref, want, atol=1e-4)
    assert not torch.allclose(ref, with_adapters, atol=1e-2)


def test_reference_cache_is_written_once_and_reused(tiny_path, tiny_tokenizer, tmp_path, monkeypatch):
    enc = _enc(tiny_tokenizer)
    policy = load_policy(tiny_path, MODEL, LORA)
    rankings = _rankings()
    key = cache_key(tiny_path, enc, rankings)
    assert key == cache_key(tiny_path, enc, list(rankings))
    assert key != cache_key(tiny_path, enc, rankings[:2])  # other data
    assert key != cache_key(tiny_path, Encoder(tiny_tokenizer, 48, 32), rankings)  # other tokenisation
    cache = tmp_path / "cache" / f"{key}.pt"
    first = reference_logps(policy, None, enc, rankings, cache_file=cache)
    assert cache.is_file() and not list(cache.parent.glob("*.tmp*"))

    def boom(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr("tether.algorithms.dpo.ranking_logps", boom)
    again = reference_logps(policy, None, enc, rankings, cache_file=cache)
    assert torch.equal(first, again)


# --------------------------------------------------------------------------- training


def _pairs_accuracy_margin(policy, enc, rankings):
    with torch.no_grad():
        lp, _ = ranking_logps(policy.eval(), collate_rankings(enc, rankings, split=True))
        ref = reference_logps(policy, None, enc, rankings)
    r = lp - ref
    return float((r[:, 0] - r[:, -1]).mean())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo", "orpo"])
def test_dpo_training_raises_the_preferred_responses(tiny_path, tiny_tokenizer, loss):
    torch.manual_seed(0)
    enc = _enc(tiny_tokenizer)
    policy = load_policy(tiny_path, MODEL, LORA)
    rankings = _rankings() * 4
    before = _pairs_accuracy_margin(policy, enc, rankings)
    cfg = DPOConfig(loss=loss, beta=2.0 if loss == "simpo" else 0.1, max_steps=12,
                    optim=OptimConfig(lr=5e-3, batch_size=4, micro_batch_size=2))
    out = train_dpo(policy, None, enc, rankings, cfg, seed=1)
    after = _pairs_accuracy_margin(policy, enc, rankings)
    assert after > before + 0.5, (before, after)  # best-ranked gains on worst-ranked, relative to the reference
    assert out["steps"] == 12 and math.isfinite(out["final_loss"])
    assert out["last"]["rewards/accuracy"] >= out["first"]["rewards/accuracy"]


def test_dpo_without_lora_needs_a_reference(tiny_path, tiny_tokenizer):
    enc = _enc(tiny_tokenizer)
    policy = load_policy(tiny_path, MODEL)
    with pytest.raises(ValueError, match="no reference model"):
        train_dpo(policy, None, enc, _rankings(), DPOConfig(max_steps=1))
    train_dpo(policy, None, enc, _rankings(), DPOConfig(loss="simpo", beta=2.0, max_steps=1))  # reference-free


def _count_fruit(prompts, responses):
    fruit = {"apple", "pear", "plum", "fig"}
    return [sum(w in fruit for w in r.split()) / max(len(r.split()), 1) for r in responses]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_rl_learns_a_callable_reward(tiny_path, tiny_tokenizer, advantage):
    from tether.algorithms.grpo import train_grpo
    from tether.config import GenerationConfig

    torch.manual_seed(0)
    enc = _enc(tiny_tokenizer)
    policy = load_policy(tiny_path, MODEL)  # all weights: a frozen copy is the reference
    from tether.models import frozen_copy

    reference = frozen_copy(policy)
    prompts = [f"write {n} words about fruits" for n in ("two", "three", "four")] * 4
    cfg = GRPOConfig(steps=20, rollout_batch_size=32, samples_per_prompt=8, mini_batch_size=32, micro_batch_size=16,
                     advantage=advantage, kl_penalty="loss" if advantage == "grpo" else "reward", beta=0.01,
                     generation=GenerationConfig(max_new_tokens=6, batch_size=32), optim=OptimConfig(lr=1e-3))

    def reward(rollout):  # brevity: one logit (EOS) to learn, so a random tiny model can
        return torch.tensor([-len(t.split()) / 6 for t in rollout.texts])

    out = train_grpo(policy, reference, enc, prompts, reward, cfg, seed=0)
    assert out["last"]["reward/score"] > out["first"]["reward/score"] + 0.15, (out["first"], out["last"])
    assert out["last"]["kl/ref"] > 0


def test_grpo_beta_zero_runs_no_reference(tiny_path, tiny_tokenizer, monkeypatch):
    from tether.algorithms import grpo
    from tether.config import GenerationConfig

    enc = _enc(tiny_tokenizer)
    policy = load_policy(tiny_path, MODEL)  # no LoRA and no reference given: fine when β = 0

    def no_reference(*a, **k):
        raise AssertionError("a reference was used with beta = 0")

    monkeypatch.setattr(grpo, "reference_context", no_reference)
    cfg = GRPOConfig(steps=2, rollout_batch_size=8, samples_per_prompt=4, mini_batch_size=8, micro_batch_size=4,
                     beta=0.0, generation=GenerationConfig(max_new_tokens=4, batch_size=8))
    out = grpo.train_grpo(policy, None, enc, ["write two words about tools"] * 3,
                          lambda r: torch.zeros(len(r)), cfg, seed=0)
    assert out["last"]["groups/flat"] == 1.0 and "kl/ref" not in out["last"]
    assert out["last"]["loss/policy"] == 0.0  # zero advantage everywhere: no NaN, no push


def test_grpo_config_checks():
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        load_config(preset="tiny", overrides=["grpo.samples_per_prompt=1"])
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(preset="tiny", overrides=["grpo.micro_batch_size=12", "grpo.mini_batch_size=48",
                                               "grpo.rollout_batch_size=48"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(preset="tiny", overrides=["dpo.loss=ipo", "dpo.label_smoothing=0.1"])


# --------------------------------------------------------------------------- rewards and the plan


def test_reward_spec_parsing():
    assert parse_reward_spec("rm") == [(1.0, "rm")]
    assert parse_reward_spec("0.5*gold + rm") == [(0.5, "gold"), (1.0, "rm")]
    assert parse_reward_spec("rm - 0.1*pkg.mod:fn") == [(1.0, "rm"), (-0.1, "pkg.mod:fn")]
    assert parse_reward_spec("1e-2*gold") == [(0.01, "gold")]
    for bad, msg in [("", "empty"), ("rm*2", "cannot read"), ("golf", "unknown reward 'golf'"), ("gold+", "cannot read")]:
        with pytest.raises(ValueError, match=msg):
            parse_reward_spec(bad)
    with pytest.raises(ConfigError, match="reward: unknown reward"):
        load_config(preset="tiny", overrides=["reward=golf"])


def test_callable_rewards_combine(monkeypatch):
    mod = types.ModuleType("my_rewards")
    mod.fruit = _count_fruit
    monkeypatch.setitem(sys.modules, "my_rewards", mod)
    fn = load_callable("my_rewards:fruit")
    with pytest.raises(ValueError, match="no function"):
        load_callable("my_rewards:nope")
    with pytest.raises(ValueError, match="cannot import"):
        load_callable("no_such_module_xyz:f")
    terms = [(2.0, lambda r, g: fn(r.prompts, r.texts)), (-1.0, lambda r, g: [1.0, 0.0])]

    class Rollout(list):  # what a reward term reads: prompts, texts, len()
        prompts = ["p", "p"]
        texts = ["apple fig", "saw fig"]

    total = combine_rewards(terms)(Rollout([0, 0]), 1)
    assert torch.allclose(total, torch.tensor([2.0 * 1.0 - 1.0, 2.0 * 0.5]))


@pytest.mark.parametrize("overrides, stages", [
    ([], ["data", "sft", "prefs", "rm", "ppo", "eval"]),
    (["policy=dpo"], ["data", "sft", "prefs", "dpo", "eval"]),
    (["policy=grpo", "reward=gold"], ["data", "sft", "grpo", "eval"]),
    (["policy=rloo", "reward=0.5*gold+rm"], ["data", "sft", "prefs", "rm", "rloo", "eval"]),
    (["policy=ppo", "reward=gold"], ["data", "sft", "ppo", "eval"]),
    (["stages=[data,sft]"], ["data", "sft"]),
])
def test_stage_plan(overrides, stages):
    from tether.cli import stages_for

    cfg = load_config(preset="tiny", overrides=overrides)
    assert cfg.stage_list() == stages
    assert cfg.eval_policies() == ["base", "sft", cfg.policy]
    assert stages_for("sft", cfg) == ["data", "sft"]
    if cfg.policy in stages:
        assert stages_for(cfg.policy, cfg) == stages[: stages.index(cfg.policy) + 1]


@pytest.mark.parametrize("case", ["rloo_kl_reward", "grpo_two_epochs"])
def test_group_rl_sampler_logprobs_change_nothing(tiny_path, tiny_tokenizer, monkeypatch, case):
    """The rollout-time log-probs read from the sampling steps give the training that a
    forward pass gives, with fewer policy passes. Float64 models, float32 log-prob buffers:
    metrics to 1e-5; weights to 1e-4, a tenth of one Adam step (lr 1e-3), because Adam's
    first steps move a weight whose gradient is ~0 by ±lr on the sign of float32 noise."""
    import copy

    import tether.algorithms.grpo as grpo
    from tether.config import GenerationConfig
    from tether.models import frozen_copy

    enc = _enc(tiny_tokenizer)
    torch.manual_seed(0)
    base = load_policy(tiny_path, MODEL).double()
    prompts = [f"write {n} words about fruits" for n in ("two", "three", "four")] * 4
    rloo = case == "rloo_kl_reward"
    cfg = GRPOConfig(steps=2, rollout_batch_size=8, samples_per_prompt=4, mini_batch_size=8 if rloo else 4,
                     micro_batch_size=4, epochs=1 if rloo else 2, advantage="rloo" if rloo else "grpo",
                     kl_penalty="reward" if rloo else "loss", beta=0.05,
                     generation=GenerationConfig(max_new_tokens=6, batch_size=8), optim=OptimConfig(lr=1e-3))
    import tether.rollout.sampler as sampler_mod

    real_generate = sampler_mod.generate  # what the policy's sampler calls

    def reward(rollout):
        return torch.tensor([-len(t.split()) / 6 for t in rollout.texts], dtype=torch.float64)

    runs = []
    for on in (True, False):
        monkeypatch.setattr(sampler_mod, "generate", real_generate if on else
                            (lambda *a, **k: real_generate(*a, **{**k, "logprobs": False})))
        policy = copy.deepcopy(base)
        calls = []
        hook = policy.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
        out = grpo.train_grpo(policy, frozen_copy(base), enc, prompts, reward, cfg, seed=2)
        hook.remove()
        runs.append((policy, out, len(calls)))
    (fast, o_fast, n_fast), (slow, o_slow, n_slow) = runs
    assert n_fast < n_slow
    for key in ("reward/score", "kl/ref"):
        assert o_fast["last"][key] == pytest.approx(o_slow["last"][key], rel=1e-5, abs=1e-5), key
    assert max(float((p - q).abs().max()) for p, q in zip(fast.parameters(), slow.parameters())) < 1e-4
    assert max(float((p - q).abs().max()) for p, q in zip(fast.parameters(), base.parameters())) > 1e-3
