"""Batched, KV-cached sampling, stopping at EOS: Tether's engine (``tether.rollout.engine``:
continuous batching, each prompt prefilled once for its samples) for Llama-shaped models,
transformers ``generate`` for the rest (or with ``generation.engine: transformers``).

The result keeps token ids (never re-tokenised text), laid out as
``[left-padded prompt | response]`` so that the response starts at the same column in
every row; ``response_mask`` covers each response up to and including its EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tether.config import GenerationConfig
from tether.data.tokenize import Encoder, pad_left

__all__ = ["Rollout", "generate", "merge_rollouts", "SamplingCopy", "active_autocast_dtype", "trimmed_batch", "group_tensors", "group_chunks"]


@dataclass
class Rollout:
    prompts: list
    query_ids: torch.Tensor  # [B, P] left-padded
    query_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R], pad after EOS
    response_mask: torch.Tensor  # [B, R], 1 up to and including EOS
    ended: torch.Tensor  # [B] bool, the response emitted EOS
    texts: list[str]
    # with generate(..., logprobs=True): the sampling model's log-prob of each response
    # token and the entropy of its distribution there, from the logits it sampled with
    # (before temperature or top-k/p), [B, R] float32, 0 past the response
    logprobs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    @property
    def start(self) -> int:
        return self.query_ids.size(1)

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def __len__(self) -> int:
        return self.query_ids.size(0)

    def select(self, index: torch.Tensor | list[int]) -> "Rollout":
        index = torch.as_tensor(index, dtype=torch.long)
        return Rollout(
            prompts=[self.prompts[i] for i in index.tolist()],
            query_ids=self.query_ids[index],
            query_mask=self.query_mask[index],
            response_ids=self.response_ids[index],
            response_mask=self.response_mask[index],
            ended=self.ended[index],
            texts=[self.texts[i] for i in index.tolist()],
            logprobs=None if self.logprobs is None else self.logprobs[index],
            entropy=None if self.entropy is None else self.entropy[index],
        )


#: the most bytes of sampling logits ``generate(..., logprobs=True)`` holds for one chunk
LOGITS_BUDGET = 1 << 30


def _response_mask(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    is_eos = response_ids == eos_id
    ended = is_eos.any(dim=1)
    # position of the first EOS (or R − 1 if none): everything up to it is the response
    first = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(ended, response_ids.size(1) - 1, dtype=torch.long))
    cols = torch.arange(response_ids.size(1)).unsqueeze(0)
    return (cols <= first.unsqueeze(1)).long(), ended


def trimmed_batch(rollout: "Rollout", rows, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Rows ``rows`` of a rollout without the columns that are padding in all of them.

    Returns (input_ids, attention_mask, start, width): the responses begin at column
    ``start`` and the first ``width`` response columns hold every real token, so results
    line up with ``[:, :width]`` of the rollout's [B, R] tensors. Forward passes on mixed
    prompt and response lengths cost what the longest row needs, not the whole batch's.
    """
    att = rollout.attention_mask[rows]
    start = rollout.start
    first = int(att[:, :start].float().argmax(dim=1).min())  # earliest real prompt token
    width = max(int(rollout.response_mask[rows].sum(dim=1).max()), 1)
    end = start + width
    return rollout.input_ids[rows][:, first:end].to(device), att[:, first:end].to(device), start - first, width


def group_tensors(rollout: "Rollout", rows, device):
    """Queries [b, P] and responses trimmed to their longest [b, W] of some rollout rows."""
    r_mask = rollout.response_mask[rows]
    width = max(int(r_mask.sum(dim=1).max()), 1)
    return (rollout.query_ids[rows].to(device), rollout.query_mask[rows].to(device),
            rollout.response_ids[rows][:, :width].to(device), r_mask[:, :width].to(device), width)


def group_chunks(rollout: "Rollout", group: int, chunk: int):
    """Row index tensors of at most max(chunk, group) rows, whole groups of ``group``
    adjacent rows each, groups of similar total length together (less padding)."""
    n_groups = len(rollout) // group
    total = (rollout.query_mask.sum(1) + rollout.response_mask.sum(1)).view(n_groups, group).max(dim=1).values
    order = torch.argsort(total, stable=True)
    per = max(chunk // group, 1)
    for b in range(0, n_groups, per):
        g = order[b : b + per]
        yield (g.unsqueeze(1) * group + torch.arange(group)).reshape(-1)


def _static_cache_ok(model, device) -> bool:
    """A pre-allocated KV cache (no concatenation at every step: ~1.8x faster decoding on a
    CPU) works when the cache dtype, the model's, matches what autocast produces. CPU only:
    on CUDA, transformers compiles the forward for a static cache on the first call and
    again for each new prompt width (measured on an H200: a 4-rollout GRPO bench took 21–74 s
    instead of 5 s), which short and varied rollouts never earn back."""
    if torch.device(device).type != "cpu":
        return False
    low = active_autocast_dtype(device)
    dtype = next(model.parameters()).dtype
    return not hasattr(model, "peft_config") and (low is None or dtype == low)


def merge_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts joined row-wise (prompts re-padded on the left, responses on the right);
    sampler log-probs are kept when every part has them."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.query_ids.size(1) for r in parts)
    w = max(r.response_ids.size(1) for r in parts)

    def lpad(x, width, value):
        return torch.nn.functional.pad(x, (width - x.size(1), 0), value=value)

    def rpad(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.size(1)), value=value)

    return Rollout(
        prompts=[q for r in parts for q in r.prompts],
        query_ids=torch.cat([lpad(r.query_ids, p, pad_id) for r in parts]),
        query_mask=torch.cat([lpad(r.query_mask, p, 0) for r in parts]),
        response_ids=torch.cat([rpad(r.response_ids, w, pad_id) for r in parts]),
        response_mask=torch.cat([rpad(r.response_mask, w, 0) for r in parts]),
        ended=torch.cat([r.ended for r in parts]),
        texts=[t for r in parts for t in r.texts],
        logprobs=None if any(r.logprobs is None for r in parts) else torch.cat([rpad(r.logprobs, w, 0.0) for r in parts]),
        entropy=None if any(r.entropy is None for r in parts) else torch.cat([rpad(r.entropy, w, 0.0) for r in parts]),
    )


@torch.no_grad()
def generate(
    model,
    encoder: Encoder,
    prompts: list,
    gen: GenerationConfig,
    *,
    seed: int | None = None,
    progress=None,
    logprobs: bool = False,
) -> Rollout:
    """Sample one response per prompt (repeat prompts in the list for several samples).

    Args:
        model: a causal LM (or peft model); put in eval mode for the call.
        encoder: tokenises prompts with the chat template.
        prompts: strings or chat-message lists.
        gen: sampling settings; ``temperature == 0`` is greedy.
        seed: seeds torch's RNG for reproducible samples.
        progress: optional callable(n_done) for progress bars.
        logprobs: also keep ``model``'s log-prob of each sampled token and the entropy
            there (``Rollout.logprobs``/``entropy``), read from the unprocessed logits of
            the sampling steps: PPO's rollout-time log-probs without a second forward pass.
            Skipped (left None) when a chunk's logits would pass ``LOGITS_BUDGET`` bytes.
    """
    from tether.rollout.engine import engine_supports

    engine = getattr(gen, "engine", "auto")
    use_engine = engine != "transformers" and len(prompts) > 0 and engine_supports(model)
    if engine == "tether" and not use_engine and prompts:
        raise ValueError(f"generation.engine: 'tether' samples Llama-shaped models (llama, mistral, qwen2, qwen3; sdpa "
                         f"or eager attention, not quantised); this is a {type(model).__name__}: use 'transformers'")
    was_training = model.training
    model.eval()
    if seed is not None:
        torch.manual_seed(seed)
    if use_engine:
        try:
            return _engine_rollout(model, encoder, prompts, gen, progress=progress, logprobs=logprobs)
        finally:
            model.train(was_training)
    device = next(model.parameters()).device
    if logprobs:  # generate holds every step's [rows, vocab] float32 logits until it returns
        vocab = model.get_output_embeddings().weight.size(0)
        logprobs = min(gen.batch_size, len(prompts)) * gen.max_new_tokens * vocab * 4 <= LOGITS_BUDGET
    parts = []
    try:
        for begin in range(0, len(prompts), gen.batch_size):
            chunk = prompts[begin : begin + gen.batch_size]
            q_ids, q_mask = pad_left([encoder.prompt_ids(p) for p in chunk], encoder.pad_id)
            sampling = gen.temperature > 0
            kwargs = dict(
                do_sample=sampling,
                max_new_tokens=gen.max_new_tokens,
                pad_token_id=encoder.pad_id,
                eos_token_id=encoder.eos_id,
                use_cache=True,
            )
            if _static_cache_ok(model, device):
                kwargs["cache_implementation"] = "static"
                # transformers sizes a static cache for the longest of all earlier calls, so the
                # attention's length (and, in bf16, its rounding) would depend on the call history:
                # a resumed run would sample differently from an uninterrupted one. Size it for this call.
                if hasattr(model, "_previous_max_cache_length"):
                    model._previous_max_cache_length = -1
            if sampling:
                kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if logprobs:
                kwargs.update(output_logits=True, return_dict_in_generate=True)
            out = model.generate(input_ids=q_ids.to(device), attention_mask=q_mask.to(device), **kwargs)
            seqs = out.sequences if logprobs else out
            resp = seqs[:, q_ids.size(1) :].cpu()
            r_mask, ended = _response_mask(resp, encoder.eos_id)
            part = Rollout(list(chunk), q_ids, q_mask, torch.where(r_mask.bool(), resp, torch.full_like(resp, encoder.pad_id)),
                           r_mask, ended, [])
            part.texts = [encoder.decode(row[: int(m.sum())]) for row, m in zip(part.response_ids, r_mask)]
            if logprobs:
                part.logprobs, part.entropy = _step_logprobs(out.logits, resp.to(device), r_mask)
            parts.append(part)
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return merge_rollouts(parts, encoder.pad_id)


def _engine_rollout(model, encoder: Encoder, prompts: list, gen: GenerationConfig, *, progress, logprobs: bool) -> Rollout:
    """A rollout sampled by :func:`tether.rollout.engine.engine_generate`, laid out as ``generate``'s."""
    from tether.rollout.engine import engine_generate

    ids = [encoder.prompt_ids(p) for p in prompts]
    tokens, lengths, ended, logps, ent = engine_generate(model, ids, gen, encoder.eos_id, logprobs=logprobs,
                                                         progress=progress)
    q_ids, q_mask = pad_left(ids, encoder.pad_id)
    cols = torch.arange(tokens.size(1)).unsqueeze(0)
    r_mask = (cols < lengths.unsqueeze(1)).long()
    response = torch.where(r_mask.bool(), tokens, torch.full_like(tokens, encoder.pad_id))
    texts = [encoder.decode(row[: int(n)]) for row, n in zip(response, lengths)]
    return Rollout(list(prompts), q_ids, q_mask, response, r_mask, ended, texts,
                   logprobs=None if logps is None else logps * r_mask, entropy=None if ent is None else ent * r_mask)


def _step_logprobs(step_logits, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each sampled token and the entropy, [B, R] each (0 past ``mask``), from
    generate's per-step logits (a tuple of R [B, V] tensors), one step at a time."""
    from tether.ops import entropy_from_logits, token_logprobs

    logps = torch.zeros(tokens.shape, dtype=torch.float32)
    ent = torch.zeros(tokens.shape, dtype=torch.float32)
    for t, logits in enumerate(step_logits):
        logps[:, t] = token_logprobs(logits.unsqueeze(1), tokens[:, t : t + 1]).squeeze(1).float().cpu()
        ent[:, t] = entropy_from_logits(logits).float().cpu()
    m = mask.to(torch.float32)
    return logps * m, ent * m


def active_autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The low-precision dtype autocast is running with on ``device``'s type, else None."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class SamplingCopy:
    """A plain low-precision copy of a trained policy, used only to sample from it.

    Under bf16 autocast, sampling from a float32 LoRA model pays for casting every weight
    and for the adapters' extra products at every decoding step. This copy holds the
    merged weights in bf16 once; ``sync()`` refreshes it after optimiser steps — for a
    peft model only the adapted matrices (base weight + LoRA delta, the base untouched),
    otherwise every parameter. Costs one extra copy of the weights in ``dtype``.
    """

    def __init__(self, policy, dtype: torch.dtype):
        import copy

        self.policy = policy
        self.dtype = dtype
        self.is_peft = hasattr(policy, "merge_and_unload")
        clone = copy.deepcopy(policy)
        plain = clone.merge_and_unload() if self.is_peft else clone
        self.model = plain.to(dtype).eval().requires_grad_(False)
        self._params = dict(self.model.named_parameters())

    @torch.no_grad()
    def sync(self) -> None:
        if not self.is_peft:
            for (name, p) in self.policy.named_parameters():
                self._params[name].copy_(p)
            return
        from peft.tuners.lora import LoraLayer

        prefix = "base_model.model."
        for name, module in self.policy.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            weight = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            target = self._params[f"{name.removeprefix(prefix)}.weight"]
            target.copy_(weight + delta if not isinstance(delta, int) else weight)
