"""PPO mechanics on the tiny model: full fine-tuning and LoRA (reference = adapters off)."""

from __future__ import annotations

import math

import pytest
import torch

from tether.algorithms.ppo import rollout_logprobs_and_values, train_ppo
from tether.config import GenerationConfig, KLConfig, LoRAConfig, ModelConfig, OptimConfig, PPOConfig
from tether.data.tokenize import Encoder
from tether.engine import MetricsLogger
from tether.models import frozen_copy, load_policy, load_scalar_model, save_checkpoint
from tether.rollout import generate
from tether.tasks import get_task

MODEL = ModelConfig(max_length=64, max_prompt_length=32)


def _cfg(**kw) -> PPOConfig:
    # PPO's mechanics on transformers' sampler, the one these tests were written against; the
    # engine's sampling is checked in test_engine.py
    base = dict(steps=3, rollout_batch_size=8, mini_batch_size=4, micro_batch_size=2, epochs=2,
                generation=GenerationConfig(max_new_tokens=6, batch_size=8, engine="transformers"),
                optim=OptimConfig(lr=1e-3))
    base.update(kw)
    return PPOConfig(**base)


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_runs_and_starts_at_zero_kl(tiny_path, tiny_tokenizer, tmp_path, lora):
    torch.manual_seed(0)
    task = get_task("tiny")
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    lcfg = LoRAConfig(enabled=lora, r=4, alpha=8)
    policy = load_policy(tiny_path, MODEL, lcfg)
    reference = None if lora else frozen_copy(policy)
    ref_before = None if lora else [p.clone() for p in reference.parameters()]
    value = load_scalar_model(tiny_path, MODEL, lcfg, pad_token_id=enc.pad_id)
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]

    def score(rollout):
        return torch.tensor(task.gold_batch(rollout.prompts, rollout.texts))

    logger = MetricsLogger(tmp_path / "m.jsonl")
    out = train_ppo(policy, value, reference, enc, task.train_prompts(), score, _cfg(), seed=1, logger=logger)
    logger.close()
    first = logger.history[0]
    assert first["kl/ref"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert all(math.isfinite(v) for row in logger.history for v in row.values() if isinstance(v, float))
    after = [p.detach() for p in policy.parameters() if p.requires_grad]
    assert any(float((a - b).abs().max()) > 0 for a, b in zip(after, before))
    if ref_before is not None:
        assert all(torch.equal(a, b) for a, b in zip(ref_before, reference.parameters()))
    assert out["steps"] == 3


def test_lora_checkpoint_is_merged_and_plain(tiny_path, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = load_policy(tiny_path, MODEL, LoRAConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # make the adapters matter
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    prompts = ["write three words about fruits"] * 2
    ids = torch.tensor([enc.prompt_ids(prompts[0])])
    with torch.no_grad():
        want = policy(input_ids=ids).logits
    save_checkpoint(policy, tiny_tokenizer, tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the training model is untouched by the merge
    assert any("lora" in n for n, _ in policy.named_parameters())


def test_rollout_layout_and_values(tiny_path, tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(tiny_path, MODEL)
    value = load_scalar_model(tiny_path, MODEL, pad_token_id=enc.pad_id)
    prompts = ["write three words about fruits", "write eight words about tools and music"]
    r = generate(policy, enc, prompts, GenerationConfig(max_new_tokens=5), seed=0)
    assert r.query_ids.shape[0] == 2 and r.response_ids.shape[1] <= 5
    # prompts are left-padded to a common column
    assert r.query_mask[:, -1].tolist() == [1, 1]
    fwd = rollout_logprobs_and_values(policy, frozen_copy(policy), value, r, chunk=1)
    for key in ("logprobs", "ref_logprobs", "values", "entropy"):
        assert fwd[key].shape == r.response_ids.shape
    torch.testing.assert_close(fwd["logprobs"], fwd["ref_logprobs"])
    # the same sample twice with one seed
    r2 = generate(policy, enc, prompts, GenerationConfig(max_new_tokens=5), seed=0)
    assert torch.equal(r.response_ids, r2.response_ids)


def test_rollout_scores_equal_text_scores(tiny_path, tiny_tokenizer):
    """Scoring a rollout's own ids gives the same reward as scoring its decoded text."""
    from tether.algorithms.reward import score_responses, score_rollout
    from tether.data.tokenize import pad_left, pad_right
    from tether.rollout import Rollout
    from tether.rollout.generate import _response_mask

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    rm = load_scalar_model(tiny_path, MODEL, pad_token_id=enc.pad_id)
    prompts = ["write three words about fruits", "write eight words about tools and music", "write four words about cats"]
    texts = ["apple pear fig", "saw drum", "the cat sat on it and so on"]
    q_ids, q_mask = pad_left([enc.prompt_ids(p) for p in prompts], enc.pad_id)
    r_ids, _ = pad_right([enc.response_ids(t, 64) for t in texts], enc.pad_id)
    r_mask, ended = _response_mask(r_ids, enc.eos_id)
    rollout = Rollout(prompts, q_ids, q_mask, r_ids, r_mask, ended, texts)
    by_ids = score_rollout(rm, rollout, chunk=2)
    by_text = score_responses(rm, enc, prompts, texts)
    torch.testing.assert_close(by_ids, by_text, atol=1e-5, rtol=1e-5)
    assert float(by_ids.std()) > 0  # distinct inputs, distinct scores: the check is not vacuous


@pytest.mark.parametrize("lora", [False, True])
def test_sampling_copy_tracks_the_policy(tiny_path, lora):
    """The bf16 sampling copy holds the policy's current (merged) weights after sync()."""
    from tether.rollout import SamplingCopy

    policy = load_policy(tiny_path, MODEL, LoRAConfig(enabled=lora, r=4, alpha=8))
    copy_ = SamplingCopy(policy, torch.float32)  # float32 so the comparison is exact
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(4, 40, (3, 9))
    mask = torch.ones_like(ids)
    assert not torch.allclose(copy_.model(input_ids=ids, attention_mask=mask).logits,
                              policy(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    copy_.sync()
    torch.testing.assert_close(copy_.model(input_ids=ids, attention_mask=mask).logits,
                               policy(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in copy_.model.parameters())
    if lora:  # the base weights under the adapters are untouched (the reference stays exact)
        with policy.disable_adapter():
            plain = load_policy(tiny_path, MODEL)
            torch.testing.assert_close(policy(input_ids=ids, attention_mask=mask).logits,
                                       plain(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    low = SamplingCopy(policy, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in low.model.parameters())


def test_hidden_states_feed_the_lm_head(tiny_path, tiny_tokenizer):
    """``return_hidden`` gives, per response token, the state the LM head read to predict it."""
    from tether.models import sequence_logprobs, token_logprobs

    torch.manual_seed(0)
    model = load_policy(tiny_path, MODEL, LoRAConfig(enabled=True, r=4, alpha=8)).eval()
    ids = torch.randint(3, 60, (3, 12))
    att = torch.ones_like(ids)
    att[0, :2] = 0  # left padding
    start = 7
    with torch.no_grad():
        logps, hidden = sequence_logprobs(model, ids, att, start, return_hidden=True)
        assert hidden.shape == (3, 12 - start, model.config.hidden_size)
        logits = model.get_output_embeddings()(hidden)
        assert torch.allclose(token_logprobs(logits, ids[:, start:]), logps, atol=1e-5)
        assert torch.allclose(logps, sequence_logprobs(model, ids, att, start), atol=1e-6)


def test_ppo_with_a_value_head_on_the_policy(tiny_path, tiny_tokenizer, tmp_path):
    """critic=head: no second backbone; the head learns, the policy moves, and the value
    loss leaves the policy's weights alone (features are detached)."""
    from tether.algorithms.ppo import ValueHead

    torch.manual_seed(0)
    task = get_task("tiny")
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(tiny_path, MODEL, LoRAConfig(enabled=True, r=4, alpha=8))
    head = ValueHead(policy.config.hidden_size)

    def score(rollout):
        return torch.tensor(task.gold_batch(rollout.prompts, rollout.texts))

    logger = MetricsLogger(tmp_path / "m.jsonl")
    train_ppo(policy, head, None, enc, task.train_prompts(), score, _cfg(steps=3), seed=1, logger=logger)
    assert logger.history[0]["value/mean"] == 0.0  # a zero-initialised head
    assert float(head.linear.weight.detach().abs().max()) > 0
    assert logger.history[-1]["value/mean"] != 0.0

    # the value loss alone puts no gradient on the policy
    ids = torch.randint(3, 60, (2, 10))
    from tether.models import sequence_logprobs

    _, hidden = sequence_logprobs(policy, ids, torch.ones_like(ids), 6, return_hidden=True)
    head(hidden).sum().backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in policy.parameters() if p.requires_grad)


@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_score_baseline_removes_what_depends_only_on_the_prompt(tiny_path, tiny_tokenizer, baseline):
    """samples_per_prompt=4: each prompt's samples sit side by side; a score that depends
    only on the prompt is all baseline under 'loo' (nothing to learn: the policy and the
    head stay put at β = 0), while without a baseline PPO follows it across prompts."""
    from tether.algorithms.ppo import ValueHead

    torch.manual_seed(0)
    task = get_task("tiny")
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(tiny_path, MODEL, LoRAConfig(enabled=True, r=4, alpha=8))
    head = ValueHead(policy.config.hidden_size)
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    seen = []

    def score(rollout):
        seen.append(list(rollout.prompts))
        return torch.tensor([float(len(str(p)) % 7) for p in rollout.prompts])

    cfg = _cfg(steps=2, samples_per_prompt=4, micro_batch_size=4, score_baseline=baseline, kl=KLConfig(init_coef=0.0, controller="fixed"))
    train_ppo(policy, head, None, enc, task.train_prompts(), score, cfg, seed=1)
    for prompts in seen:
        assert len(prompts) == 8 and all(prompts[i] == prompts[i - i % 4] for i in range(8))
        assert prompts[0] != prompts[4]
    moved = any(float((p.detach() - b).abs().max()) > 0
                for p, b in zip((p for p in policy.parameters() if p.requires_grad), before))
    assert moved == (baseline == "none")


def test_score_baseline_config_checks():
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="samples_per_prompt"):
        _cfg(samples_per_prompt=3, share_prompt=False)  # does not divide rollout_batch_size 8
    with pytest.raises(ConfigError, match="score_baseline"):
        _cfg(score_baseline="loo")


@pytest.mark.parametrize("critic", ["head", "model"])
def test_shared_prompt_ppo_equals_full_rows(tiny_path, tiny_tokenizer, critic):
    """share_prompt (each prompt run once for its G samples) changes the cost, not the
    result: the same rollouts, scores, values, losses and updates as full rows."""
    from tether.algorithms.ppo import ValueHead
    from tether.algorithms.reward import score_rollout

    task = get_task("tiny")
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    lcfg = LoRAConfig(enabled=True, r=4, alpha=8)
    torch.manual_seed(0)
    rm = load_scalar_model(tiny_path, MODEL, lcfg, pad_token_id=enc.pad_id)
    for name, p in rm.named_parameters():  # a reward model whose scores differ between samples
        if "lora_B" in name or "score" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(7))
    rm.requires_grad_(False)
    runs = []
    for share in (True, False):
        torch.manual_seed(0)
        policy = load_policy(tiny_path, MODEL, lcfg)
        value = (ValueHead(policy.config.hidden_size) if critic == "head"
                 else load_scalar_model(tiny_path, MODEL, lcfg, pad_token_id=enc.pad_id))
        calls = []

        def score(rollout, group=1):
            calls.append(group)
            return score_rollout(rm, rollout, chunk=4, group=group)

        logger = MetricsLogger(None)
        cfg = _cfg(steps=2, samples_per_prompt=4, micro_batch_size=4, score_baseline="loo", share_prompt=share)
        train_ppo(policy, value, None, enc, task.train_prompts(), score, cfg, seed=3, logger=logger)
        runs.append((logger.history, calls, [p.detach().clone() for n, p in policy.named_parameters() if "lora_B" in n]))
    (h_share, c_share, w_share), (h_full, c_full, w_full) = runs
    assert c_share == [4, 4] and c_full == [1, 1]
    for a, b in zip(h_share, h_full):
        for key in ("reward/score", "kl/ref", "loss/policy", "loss/value", "value/mean", "policy/entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
    for a, b in zip(w_share, w_full):
        assert torch.allclose(a, b, atol=1e-4)
    assert any(float(w.abs().max()) > 0 for w in w_share)  # LoRA B starts at zero: the policy moved


def test_share_prompt_needs_whole_groups_per_micro_batch():
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="micro_batch_size"):
        _cfg(samples_per_prompt=4, micro_batch_size=2)
    _cfg(samples_per_prompt=4, micro_batch_size=2, share_prompt=False)  # full rows: any split works


def test_generate_keeps_the_sampling_models_logprobs(tiny_path, tiny_tokenizer):
    """generate(logprobs=True): each sampled token's log-prob and the entropy, from the raw
    logits (top-k and temperature do not touch them), equal to a forward pass over the
    rollout; 0 past each response; kept across generation chunks."""
    from tether.algorithms.ppo import rollout_logprobs_and_values

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(tiny_path, MODEL)
    value = load_scalar_model(tiny_path, MODEL, pad_token_id=enc.pad_id)
    prompts = ["write three words about fruits", "write eight words about tools and music", "hi"]
    gen = GenerationConfig(max_new_tokens=7, temperature=0.7, top_k=5, batch_size=2)
    r = generate(policy, enc, prompts, gen, seed=4, logprobs=True)
    assert r.logprobs.shape == r.entropy.shape == r.response_ids.shape
    plain = generate(policy, enc, prompts, gen, seed=4)
    assert plain.logprobs is None and torch.equal(plain.response_ids, r.response_ids)  # same samples
    r.logprobs, r.entropy, lp, ent = None, None, r.logprobs, r.entropy
    fwd = rollout_logprobs_and_values(policy, frozen_copy(policy), value, r, chunk=3)
    torch.testing.assert_close(lp, fwd["logprobs"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ent, fwd["entropy"], atol=1e-4, rtol=1e-4)
    assert float(lp.abs().sum()) > 0 and bool((lp[r.response_mask == 0] == 0).all())
    sub = r.select([2, 0])
    assert sub.logprobs is None
    r.logprobs = lp
    torch.testing.assert_close(r.select([2, 0]).logprobs, lp[[2, 0]])


def test_generate_skips_logprobs_over_the_logits_budget(tiny_path, tiny_tokenizer, monkeypatch):
    import importlib

    g = importlib.import_module("tether.rollout.generate")  # the package exports a function of that name

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(tiny_path, MODEL)
    gen = GenerationConfig(max_new_tokens=4, batch_size=2, engine="transformers")  # the engine holds no step logits
    vocab = policy.get_output_embeddings().weight.size(0)
    monkeypatch.setattr(g, "LOGITS_BUDGET", 2 * 4 * vocab * 4)  # exactly one chunk's logits
    assert generate(policy, enc, ["hi", "write three words"], gen, seed=0, logprobs=True).logprobs is not None
    monkeypatch.setattr(g, "LOGITS_BUDGET", 2 * 4 * vocab * 4 - 1)
    assert generate(policy, enc, ["hi", "write three words"], gen, seed=0, logprobs=True).logprobs is None


def test_rollout_forward_of_some_rows_equals_all_rows(tiny_path, tiny_tokenizer):
    from tether.algorithms.ppo import rollout_logprobs_and_values

    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    policy = load_policy(tiny_path, MODEL)
    value = load_scalar_model(tiny_path, MODEL, pad_token_id=enc.pad_id)
    prompts = ["write three words about fruits", "write eight words", "hi", "write two words about cats"]
    r = generate(policy, enc, [p for p in prompts for _ in range(2)], GenerationConfig(max_new_tokens=6), seed=1)
    ref = frozen_copy(policy)
    whole = rollout_logprobs_and_values(policy, ref, value, r, chunk=4, group=2)
    rows = torch.tensor([2, 3, 6, 7])
    some = rollout_logprobs_and_values(policy, ref, value, r, chunk=4, group=2, rows=rows)
    others = torch.tensor([0, 1, 4, 5])
    for key in whole:
        torch.testing.assert_close(some[key][rows], whole[key][rows], atol=1e-5, rtol=1e-5)
        assert bool((some[key][others] == 0).all())


def test_dropout_free():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tether.algorithms.ppo import ValueHead, dropout_free

    def model(**kw):
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, **kw))

    assert dropout_free(model(), ValueHead(8))
    assert not dropout_free(model(attention_dropout=0.1))
    assert not dropout_free(model(), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))


@pytest.mark.parametrize("critic,group", [("model", 1), ("model", 2), ("head", 2)])
@pytest.mark.parametrize("shortcut", ["first_update", "sampler_logprobs"])
def test_ppo_rollout_shortcuts_change_nothing(tiny_path, tiny_tokenizer, monkeypatch, critic, group, shortcut):
    """The first update's forward pass standing for its rows' rollout-time pass, and the
    sampler's own log-probs standing for the policy's forward pass, give the same training
    with fewer forward passes of the policy. Float64 models: the first is exact (1e-9); the
    second reads log-probs from another kernel (decoding steps) kept in float32 buffers
    (metrics to 1e-5, weights to 1e-4: Adam's first steps move a weight whose gradient is
    ~0 by ±lr on the sign of float32 noise)."""
    import copy

    import tether.algorithms.ppo as ppo
    import tether.rollout.sampler as sampler_mod
    from tether.algorithms.ppo import ValueHead

    task = get_task("tiny")
    enc = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    torch.manual_seed(0)
    base = load_policy(tiny_path, MODEL).double()
    base_value = load_scalar_model(tiny_path, MODEL, pad_token_id=enc.pad_id).double()
    real_generate = sampler_mod.generate  # what the policy's sampler calls

    def score(rollout):
        return torch.tensor(task.gold_batch(rollout.prompts, rollout.texts), dtype=torch.float64)

    def no_logprobs(*a, **k):
        return real_generate(*a, **{**k, "logprobs": False})

    runs = []
    for on in (True, False):
        if shortcut == "first_update":
            monkeypatch.setattr(sampler_mod, "generate", no_logprobs)  # the other shortcut off in both runs
            monkeypatch.setattr(ppo, "dropout_free", (lambda *m: True) if on else (lambda *m: False))
        else:
            monkeypatch.setattr(ppo, "dropout_free", lambda *m: False)
            monkeypatch.setattr(sampler_mod, "generate", real_generate if on else no_logprobs)
        policy = copy.deepcopy(base)
        value = ValueHead(policy.config.hidden_size).double() if critic == "head" else copy.deepcopy(base_value)
        calls = []
        hook = policy.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
        logger = MetricsLogger(None)
        cfg = _cfg(steps=2, samples_per_prompt=group, critic=critic)
        train_ppo(policy, value, frozen_copy(policy), enc, task.train_prompts(), score, cfg, seed=5, logger=logger)
        hook.remove()
        runs.append((policy, logger.history, len(calls)))
    (fast, h_fast, n_fast), (slow, h_slow, n_slow) = runs
    tol = 1e-9 if shortcut == "first_update" else 1e-5
    if shortcut == "first_update" or critic == "model":  # a value head needs the policy's states anyway
        assert n_fast < n_slow
    for a, b in zip(h_fast, h_slow):
        for key in ("reward/score", "kl/ref", "loss/policy", "loss/value", "value/mean", "policy/entropy"):
            assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), key
    w_tol = tol if shortcut == "first_update" else 1e-4
    assert max(float((p - q).abs().max()) for p, q in zip(fast.parameters(), slow.parameters())) < w_tol
    assert max(float((p - q).abs().max()) for p, q in zip(fast.parameters(), base.parameters())) > 1e-4
