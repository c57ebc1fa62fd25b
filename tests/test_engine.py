"""The generation engine (tether.rollout.engine) against transformers and full forward passes.

A small random Llama with grouped-query attention (4 query heads over 2 kv heads) and
peaked distributions stands in for a real model: its greedy answers differ by prompt and
stop at EOS at different lengths, so slot refills and moves are exercised."""

from __future__ import annotations

import pytest
import torch

from tether.config import GenerationConfig
from tether.rollout.engine import _pick, engine_generate, engine_supports

EOS = 94  # a token the greedy answers below emit at different steps


def _model(seed: int = 0, dtype=torch.float32, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.3, tie_word_embeddings=True, bos_token_id=0, eos_token_id=EOS,
                      pad_token_id=None, attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    prefix = [0, 5, 6, 7]  # a shared "system prompt": computed once for the call
    out = [prefix + torch.randint(2, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (7,), generator=g)]
    return out + [out[2], out[2], [0, 9, 9]]  # repeated prompts (forked KV) and one without the prefix


def _hf_greedy(model, ids: list[int], max_new: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=EOS,
                         temperature=None, top_p=None, top_k=None)
    resp = out[0, len(ids):].tolist()
    return resp[: resp.index(EOS) + 1] if EOS in resp else resp


def _rows(tokens, lengths) -> list[list[int]]:
    return [row[: int(n)].tolist() for row, n in zip(tokens, lengths)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_equals_transformers_generate(attn):
    model = _model(attn=attn)
    prompts = _prompts()
    gen = GenerationConfig(max_new_tokens=12, temperature=0.0)
    tokens, lengths, ended, _, _ = engine_generate(model, prompts, gen, EOS)
    want = [_hf_greedy(model, p, 12) for p in prompts]
    assert _rows(tokens, lengths) == want
    assert ended.tolist() == [w[-1] == EOS for w in want]
    assert len({len(w) for w in want}) > 2, "the test model should end at different lengths"


def test_slot_refills_give_the_same_answers():
    """Three slots for ten rows (refills, finished rows replaced by moved ones) equal one batch."""
    model = _model()
    prompts = _prompts()
    gen = GenerationConfig(max_new_tokens=12, temperature=0.0)
    wide = engine_generate(model, prompts, gen, EOS, logprobs=True)
    for slots in (1, 3):
        narrow = engine_generate(model, prompts, gen, EOS, logprobs=True, slots=slots)
        assert _rows(narrow[0], narrow[1]) == _rows(wide[0], wide[1])
        torch.testing.assert_close(narrow[3], wide[3], atol=1e-5, rtol=1e-5)  # batch size changes the matmul blocking


def test_logprobs_and_entropy_equal_a_full_forward_pass():
    model = _model()
    prompts = _prompts()
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0)
    torch.manual_seed(3)
    tokens, lengths, _, logps, ent = engine_generate(model, prompts, gen, EOS, logprobs=True)
    for i, p in enumerate(prompts):
        resp = tokens[i, : lengths[i]]
        with torch.no_grad():
            logits = model(torch.tensor([p + resp.tolist()])).logits[0, len(p) - 1 : -1].float()  # [R, V]
        full = logits.log_softmax(-1)
        torch.testing.assert_close(logps[i, : lengths[i]], full.gather(1, resp[:, None]).squeeze(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(ent[i, : lengths[i]], -(full.exp() * full).sum(-1), atol=1e-4, rtol=0)
        assert (logps[i, lengths[i]:] == 0).all() and (ent[i, lengths[i]:] == 0).all()


def test_sampling_is_reproducible_and_keeps_no_state():
    """Same seed → same samples, whatever ran before (a resumed run samples as an uninterrupted one)."""
    model = _model()
    prompts = _prompts()
    gen = GenerationConfig(max_new_tokens=10, temperature=1.0)

    def run(seed):
        torch.manual_seed(seed)
        t, n, *_ = engine_generate(model, prompts, gen, EOS)
        return _rows(t, n)

    first = run(5)
    engine_generate(model, prompts[:3] * 5, GenerationConfig(max_new_tokens=30), EOS)  # other work in between
    assert run(5) == first
    assert run(6) != first


def test_weights_stay_in_step_with_training():
    """After an optimiser step (in place, the tied head included) and with LoRA adapters, the
    engine samples from the current weights: greedy answers equal transformers' on them."""
    from peft import LoraConfig, get_peft_model

    model = _model()
    prompts = _prompts()
    gen = GenerationConfig(max_new_tokens=8, temperature=0.0)
    before = engine_generate(model, prompts, gen, EOS)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss
    loss.backward()
    opt.step()
    after = engine_generate(model, prompts, gen, EOS)
    assert _rows(after[0], after[1]) == [_hf_greedy(model, p, 8) for p in prompts]
    assert _rows(after[0], after[1]) != _rows(before[0], before[1])

    lora = get_peft_model(_model(seed=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                                    init_lora_weights=False))
    lora.eval()
    assert engine_supports(lora)
    got = engine_generate(lora, prompts, gen, EOS)
    assert _rows(got[0], got[1]) == [_hf_greedy(lora, p, 8) for p in prompts]


def test_pick_follows_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    assert set(_pick(logits, GenerationConfig(temperature=0.0)).tolist()) == {0}
    assert set(_pick(logits, GenerationConfig(top_k=2)).tolist()) == {0, 1}
    # top-p 0.7: the head whose mass reaches 0.7 is tokens 0 and 1 (p = 0.61, 0.22)
    assert set(_pick(logits, GenerationConfig(top_p=0.7)).tolist()) == {0, 1}
    # frequencies follow softmax(logits / T) (binomial s.e. ≈ 0.011 at n = 2000)
    draws = _pick(logits, GenerationConfig(temperature=2.0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    torch.testing.assert_close(freq, (logits[0] / 2).softmax(-1), atol=0.045, rtol=0)


def test_rollout_through_generate_matches_transformers(tiny_path, tiny_tokenizer):
    """``tether.rollout.generate`` lays the engine's samples out as transformers' path does."""
    from tether.config import ModelConfig
    from tether.data.tokenize import Encoder
    from tether.models import load_policy
    from tether.rollout import generate

    model = load_policy(tiny_path, ModelConfig(name=tiny_path), trainable=False)
    enc = Encoder(tiny_tokenizer, 64, 32)
    prompts = ["count to five", "say hello world", "one two three four", "count to five"]
    rolls = {e: generate(model, enc, prompts, GenerationConfig(max_new_tokens=8, temperature=0.0, engine=e),
                         seed=0, logprobs=True) for e in ("transformers", "tether")}
    a, b = rolls["transformers"], rolls["tether"]
    assert a.texts == b.texts
    for name in ("query_ids", "query_mask", "response_mask", "ended"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    w = int(a.response_mask.sum(1).max())
    assert torch.equal(a.response_ids[:, :w], b.response_ids[:, :w])
    torch.testing.assert_close(a.logprobs[:, :w], b.logprobs[:, :w], atol=1e-4, rtol=0)


def test_engine_choice_is_checked():
    from tether.config import ConfigError

    with pytest.raises(ConfigError, match="engine"):
        GenerationConfig(engine="vllm")


@pytest.mark.slow
def test_smollm2_greedy_and_logprobs(_tether_home):
    """On the default's real model and prompts: greedy tokens equal transformers ``generate``
    (one prompt at a time, no padding), and the sampling log-probs equal a full forward pass."""
    from tether.config import ModelConfig
    from tether.data.tokenize import Encoder
    from tether.models import load_policy, load_tokenizer
    from tether.tasks import get_task
    from tether.zoo import pull

    path = str(pull("smollm2-135m-instruct"))
    model = load_policy(path, ModelConfig(name=path), trainable=False).eval()
    enc = Encoder(load_tokenizer(path), 224, 160)
    prompts = [enc.prompt_ids(p) for p in get_task("instruct").heldout_prompts()[:6]]
    prompts += prompts[:2]  # repeated prompts share their prefill
    eos = enc.eos_id
    gen = GenerationConfig(max_new_tokens=24, temperature=0.0)
    tokens, lengths, *_ = engine_generate(model, prompts, gen, eos)
    want = []
    for p in prompts:
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=enc.pad_id,
                             temperature=None, top_p=None, top_k=None)[0, len(p):].tolist()
        want.append(out[: out.index(eos) + 1] if eos in out else out)
    assert _rows(tokens, lengths) == want
    torch.manual_seed(0)
    tokens, lengths, _, logps, _ = engine_generate(model, prompts[:4], GenerationConfig(max_new_tokens=24), eos,
                                                   logprobs=True)
    for i, p in enumerate(prompts[:4]):
        resp = tokens[i, : lengths[i]]
        with torch.no_grad():
            full = model(torch.tensor([p + resp.tolist()])).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        torch.testing.assert_close(logps[i, : lengths[i]], full.gather(1, resp[:, None]).squeeze(1), atol=1e-4, rtol=0)
