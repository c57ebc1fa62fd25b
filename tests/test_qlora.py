"""QLoRA: LoRA adapters on a 4-bit NF4 base (bitsandbytes). Its CPU kernels run the tiny
model here; the GPU figures on SmolLM2 are in the issue notes (docs/scaling.md)."""

from __future__ import annotations

import pytest
import torch

from tether.config import ConfigError, DPOConfig, LoRAConfig, ModelConfig, OptimConfig

pytest.importorskip("bitsandbytes")

MODEL = ModelConfig(max_length=64, max_prompt_length=32)
QLORA = LoRAConfig(enabled=True, r=4, alpha=8, quantize="4bit", compute_dtype="float32")


def test_quantize_needs_lora():
    with pytest.raises(ConfigError, match="quantize"):
        LoRAConfig(enabled=False, quantize="4bit")


@pytest.mark.smoke
def test_qlora_dpo_trains_adapters_on_a_4bit_base_and_saves_a_full_precision_merge(tiny_path, tiny_tokenizer,
                                                                                    tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from tether.algorithms.dpo import train_dpo
    from tether.data.tokenize import Encoder
    from tether.models import is_quantized, load_policy, save_checkpoint
    from test_invariants import _rankings

    torch.manual_seed(0)
    policy = load_policy(tiny_path, MODEL, QLORA)
    assert is_quantized(policy)
    linear4 = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.dtype == torch.uint8 for m in linear4)  # packed NF4
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    encoder = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the reference passes run in eval mode first
        warnings.simplefilter("always")
        out = train_dpo(policy, None, encoder, _rankings(16),
                        DPOConfig(max_steps=4, optim=OptimConfig(lr=5e-3, batch_size=8, micro_batch_size=4)), seed=1)
    # no pass without a backward kernel (bitsandbytes' CPU inference repacking) was trained through
    assert not [w for w in caught if "gemv_4bit" in str(w.message)]
    assert out["steps"] == 4 and all(torch.isfinite(torch.tensor(v)) for v in [out["final_loss"]])
    moved = max(float((p.detach() - trainable[n]).abs().max()) for n, p in policy.named_parameters()
                if p.requires_grad and "lora_B" in n)
    assert moved > 1e-4  # lora_B starts at 0

    save_checkpoint(policy, tiny_tokenizer, tmp_path / "ckpt")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert getattr(saved.config, "quantization_config", None) is None
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    # every weight is the full-precision base plus its adapter's delta B·A·(alpha / r)
    from peft.tuners.lora import LoraLayer

    checked = 0
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            key = name.removeprefix("base_model.model.") + ".weight"
            delta = (module.lora_B["default"].weight @ module.lora_A["default"].weight) * module.scaling["default"]
            expect = base.state_dict()[key] + delta.detach().float().cpu()
            assert torch.allclose(saved.state_dict()[key], expect, atol=1e-6), key
            checked += 1
    assert checked >= 7
    norm = "model.norm.weight"
    assert torch.equal(saved.state_dict()[norm], base.state_dict()[norm])


@pytest.mark.smoke
def test_qlora_reward_model_trains_its_head_and_adapters(tiny_path, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tether.algorithms.reward import train_reward
    from tether.config import RMConfig
    from tether.data.tokenize import Encoder
    from tether.models import is_quantized, load_scalar_model, save_checkpoint
    from test_invariants import _rankings

    encoder = Encoder(tiny_tokenizer, MODEL.max_length, MODEL.max_prompt_length)
    model = load_scalar_model(tiny_path, MODEL, QLORA, pad_token_id=encoder.pad_id)
    assert is_quantized(model)
    head = [n for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert head, "the reward head must train under QLoRA"
    out = train_reward(model, encoder, _rankings(16),
                       RMConfig(max_steps=3, optim=OptimConfig(lr=5e-3, batch_size=8, micro_batch_size=8)), seed=2)
    assert out["steps"] == 3
    save_checkpoint(model, tiny_tokenizer, tmp_path / "rm")
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert saved.config.num_labels == 1 and getattr(saved.config, "quantization_config", None) is None
