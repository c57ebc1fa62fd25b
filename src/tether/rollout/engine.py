"""Tether's generation engine: continuous batching on a slot KV cache.

transformers ``generate`` decodes a fixed batch until its longest row ends, runs the same
prompt once per sample, and sizes its batches by a number in the config. On a small model
on a CPU most of that is waste. This engine keeps the model's own decoder layers (the maths
is transformers', so any Llama-shaped model works, LoRA adapters included) and writes only
what ``generate`` lacks:

- **each distinct prompt is prefilled once** for all of its samples: its keys and values are
  copied into the K slots that sample it (the KV cache is forked, not recomputed);
- **continuous batching**: the decoding batch is a table of slots; a row that emits EOS or
  reaches ``max_new_tokens`` leaves at once, the last active slot moves into its place (the
  active slots stay a contiguous block, so every step works on views, not gathers), and
  freed slots are refilled with waiting prompts, so no step decodes padding;
- **logits only where a token is sampled** (the last prompt position, then each new token);
- **the number of slots comes from memory**: as many as a KV-cache budget holds for the
  call's longest prompt plus ``max_new_tokens``, capped where a CPU's matrix products stop
  getting faster per row.

Sampling follows transformers' order (temperature, then top-k, then top-p) and draws from
torch's global generator, seeded by the caller, so a call is reproducible; the optional
log-probs and entropies are read from the unprocessed logits of the sampling steps.
"""

from __future__ import annotations

import inspect
import math
import os

import torch
import torch.nn.functional as F

__all__ = ["engine_supports", "engine_generate", "engine_stream", "engine_last_logits", "engine_slots"]

#: model types whose decoder layers take (hidden, attention_mask, position_ids, cache,
#: position_embeddings) and whose model forward is embed → layers → final norm → head
_LLAMA_SHAPED = {"llama", "mistral", "qwen2", "qwen3"}
#: attention implementations that take an explicit [B, 1, q, k] mask
_MASKED_ATTENTION = {"sdpa", "eager"}

#: bytes of KV cache the engine may allocate on a CPU (slots × positions × layers × 2 × heads × dim)
CPU_KV_BUDGET = 1 << 30
#: on a CPU more slots than this stop paying: the matrix products are already efficient
#: and attention over the slot cache starts to cost (measured in bench/sampling.py)
CPU_MAX_SLOTS = 128
GPU_MAX_SLOTS = 1024
#: a prefill's padded size is at most this times its prompts' tokens (else it is split)
PREFILL_PADDING = 1.1
#: a common prefix of at least this many tokens is prefilled once for the whole call
MIN_SHARED_PREFIX = 4


def _inner(model):
    """The transformers causal LM under a peft wrapper (its LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def engine_supports(model) -> bool:
    """Whether ``model`` can sample through the engine (else transformers ``generate``)."""
    from tether.models import is_quantized

    inner = _inner(model)
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _LLAMA_SHAPED or is_quantized(model):
        return False
    if getattr(cfg, "_attn_implementation", "eager") not in _MASKED_ATTENTION:
        return False
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and cfg.sliding_window) or \
            any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return False  # a sliding window: the full-attention mask here would be wrong
    body = getattr(inner, "model", None)
    return all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


def engine_slots(model, n_rows: int, length: int, device: torch.device, dtype: torch.dtype) -> int:
    """Slots for a call: what the KV budget holds at ``length`` positions, at most ``n_rows``."""
    cfg = _inner(model).config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_slot = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * length * dtype.itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, cap = int(free * 0.3), GPU_MAX_SLOTS
    else:
        budget, cap = CPU_KV_BUDGET, CPU_MAX_SLOTS
    return max(1, min(n_rows, cap, budget // max(per_slot, 1)))


class _SlotCache:
    """Keys and values of ``slots`` sequences × ``length`` positions for every layer, filled by
    the attention layers through ``update`` (the method transformers' layers call).

    In a prefill the layers give a batch of prompts' keys/values [n, H, T, d]; they are copied
    into the slots ``dest`` (row ``src[i]`` into slot ``dest[i]``) and returned as they are
    (attention within the prompts). Decoding writes one position per active slot itself.
    """

    def __init__(self, n_layers: int, slots: int, length: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.slots, self.length = slots, length
        self.src = self.dest = None
        self.p0 = 0  # length of the prefix every prompt of the call shares (its KV computed once)
        self.prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            shape = (self.slots, like.size(1), self.length, like.size(3))  # [S, H, L, d]
            # zeros, not empty: a masked-out NaN would still poison attention (0 × NaN)
            self.k[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.v[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.k[layer], self.v[layer]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by a layer's attention in a prefill.

        With ``dest`` None (the shared prefix): [1, H, P0, d] is written into every slot and
        kept. Otherwise: the prompts' rest [n, H, T, d] goes into the slots ``dest`` at
        positions P0..P0+T−1, and attention sees the shared prefix followed by it."""
        kc, vc = self._buffers(layer_idx, key_states)
        if self.dest is None:
            kc[:, :, : key_states.size(2)] = key_states
            vc[:, :, : value_states.size(2)] = value_states
            self.prefix[layer_idx] = (key_states, value_states)
            return key_states, value_states
        p0, t = self.p0, key_states.size(2)
        kc[self.dest, :, p0 : p0 + t] = key_states[self.src]
        vc[self.dest, :, p0 : p0 + t] = value_states[self.src]
        if not p0:
            return key_states, value_states
        pk, pv = self.prefix[layer_idx]
        n = key_states.size(0)
        return (torch.cat([pk.expand(n, -1, -1, -1), key_states], dim=2),
                torch.cat([pv.expand(n, -1, -1, -1), value_states], dim=2))

    def move(self, holes: torch.Tensor, movers: torch.Tensor, width: int) -> None:
        """Copy slots ``movers`` into slots ``holes`` (positions below ``width``)."""
        for kc, vc in zip(self.k, self.v):
            if kc is not None:
                kc[holes, :, :width] = kc[movers, :, :width]
                vc[holes, :, :width] = vc[movers, :, :width]


class _Runner:
    """Forward passes through the model's own modules with a :class:`_SlotCache`."""

    def __init__(self, model):
        inner = _inner(model)
        self.body = inner.model
        self.head = inner.get_output_embeddings()
        self.layers = list(self.body.layers)
        params = inspect.signature(self.layers[0].forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.sdpa = getattr(inner.config, "_attn_implementation", "eager") == "sdpa"
        self.device = next(inner.parameters()).device
        self._head_key, self._head_t = None, None

    def _mask(self, allowed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """[B, 1, q, k] attention mask: bool for SDPA, additive (0 / min) for eager attention."""
        allowed = allowed[:, None]
        if self.sdpa:
            return allowed
        return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
            ~allowed, torch.finfo(like.dtype).min)

    def _layers(self, x, mask, positions, cache):
        cos_sin = self.body.rotary_emb(x, positions)
        kwargs = {self.cache_arg: cache, "use_cache": True}
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[n, D] final hidden states → [n, V] float32 logits. The head's weight [V, D] is kept
        transposed ([D, V], contiguous: ~25% faster on a CPU than ``linear``'s transposed
        read), refreshed whenever the weight changes in place (its version counter)."""
        w = self.head.weight
        key = (w.data_ptr(), w._version)
        if self._head_key != key or self._head_t.dtype != h.dtype:
            self._head_t = w.detach().t().contiguous().to(h.dtype)
            self._head_key = key
        out = h @ self._head_t
        if getattr(self.head, "bias", None) is not None:
            out = out + self.head.bias
        return out.float()

    def prefill_prefix(self, ids: torch.Tensor, cache: _SlotCache) -> None:
        """The shared prefix ``ids`` [P0] into every slot (its keys/values kept for the prompts)."""
        cache.dest = None
        x = self.body.embed_tokens(ids[None])  # [1, P0, D]
        cols = torch.arange(ids.numel(), device=ids.device)
        allowed = (cols[None, :] <= cols[:, None])[None]  # [1, P0, P0]
        self._layers(x, self._mask(allowed, x), cols[None], cache)
        cache.p0 = ids.numel()

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: _SlotCache) -> torch.Tensor:
        """Logits [n, V] at the last position of each right-padded prompt row of ``ids`` [n, T]
        (the prompts after their shared prefix of ``cache.p0`` positions)."""
        n, t = ids.shape
        p0 = cache.p0
        x = self.body.embed_tokens(ids)  # [n, T, D]
        cols = torch.arange(t, device=ids.device)
        # causal, and no key past the row's prompt: [n, T, T]; the prefix is seen by every position
        allowed = (cols[None, :] <= cols[:, None])[None] & (cols[None, None, :] < lengths[:, None, None])
        if p0:
            allowed = torch.cat([allowed.new_ones(n, t, p0), allowed], dim=2)  # [n, T, P0 + T]
        x = self._layers(x, self._mask(allowed, x), (cols + p0).expand(n, t), cache)
        last = x[torch.arange(n, device=ids.device), lengths - 1]  # [n, D]
        return self.logits(self.body.norm(last))

    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: _SlotCache) -> torch.Tensor:
        """Logits [A, V] for one new token per active slot (slots 0..A−1) at positions ``pos``.

        The layers' own projections, norms and MLPs; the attention of one query per slot is
        written here, over the slot cache, each kv head's G query heads taken as G queries
        (no repeated keys)."""
        a = tokens.size(0)
        rows = torch.arange(a, device=tokens.device)
        width = int(pos.max()) + 1
        x = self.body.embed_tokens(tokens)  # [A, D]
        cos, sin = self.body.rotary_emb(x, pos[:, None])  # [A, 1, d]
        cols = torch.arange(width, device=tokens.device)
        past = (cols[None, :] > pos[:, None])[:, None, None, :]  # [A, 1, 1, W]: not yet written
        bias = torch.zeros(past.shape, device=x.device).masked_fill_(past, -math.inf)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            hd = attn.head_dim
            q = attn.q_proj(h).view(a, -1, hd)  # [A, Hq, d]
            k = attn.k_proj(h).view(a, -1, hd)  # [A, Hkv, d]
            v = attn.v_proj(h).view(a, -1, hd)
            if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = cache._buffers(i, k.unsqueeze(2))
            kc[rows, :, pos] = k.to(kc.dtype)
            vc[rows, :, pos] = v.to(vc.dtype)
            keys, values = kc[:a, :, :width], vc[:a, :, :width]  # [A, Hkv, W, d]
            # the G query heads of each kv head as G queries: [A, Hkv, G, d] over [A, Hkv, W, d]
            # scores [A, Hkv, G, W]: a batched product, cheaper here than SDPA's CPU kernel for
            # one query per slot (its blocking is for long queries); masked past each slot's end
            scores = torch.matmul(q.view(a, keys.size(1), -1, hd).to(keys.dtype), keys.transpose(-1, -2))
            out = torch.matmul(scores.mul_(attn.scaling).add_(bias).softmax(dim=-1), values)  # [A, Hkv, G, d]
            out = out.reshape(a, -1)  # [A, Hq·d]
            x = x + attn.o_proj(out.to(h.dtype))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.logits(self.body.norm(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _pick(logits: torch.Tensor, gen) -> torch.Tensor:
    """Tokens [A] sampled from logits [A, V]: greedy at temperature 0, else temperature →
    top-k → top-p (transformers' order, one token always kept), then a multinomial draw."""
    if gen.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / gen.temperature if gen.temperature != 1 else logits
    if gen.top_k and gen.top_k < scores.size(-1):
        kth = torch.topk(scores, gen.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if gen.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - gen.top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
    # inverse-CDF draw: ~30x cheaper than torch.multinomial at [64, 49152] on a CPU
    # unnormalised (the draw is scaled by the total); masked scores give exp(−inf) = 0
    cdf = (scores - scores.max(dim=-1, keepdim=True).values).exp_().cumsum(dim=-1)  # [A, V]
    u = torch.rand(cdf.size(0), 1, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.size(1) - 1)


@torch.no_grad()
def engine_generate(model, prompt_ids: list[list[int]], gen, eos_id: int, *, logprobs: bool = False,
                    progress=None, slots: int | None = None):
    """One response per prompt in ``prompt_ids`` (token id lists; equal lists are prefilled once).

    Returns (tokens, lengths, ended, logps, entropy): ``tokens`` [B, R] (R the longest
    response; past a row's length the values are meaningless), ``lengths`` [B] (EOS included),
    ``ended`` [B] bool; ``logps``/``entropy`` [B, R] float32 (0 past the response) or None.
    The caller seeds torch's generator and puts the model in eval mode.
    """
    n_rows, max_new = len(prompt_ids), gen.max_new_tokens
    if not n_rows:
        empty = torch.zeros(0, 1)
        return empty.long(), empty[:, 0].long(), empty[:, 0].bool(), (empty if logprobs else None), (empty if logprobs else None)
    runner = _Runner(model)
    device = runner.device
    # ---- the work queue: distinct prompts in order of first appearance, each with its rows
    first: dict[tuple, int] = {}
    unique: list[list[int]] = []
    rows_of: list[list[int]] = []
    for row, ids in enumerate(prompt_ids):
        key = tuple(ids)
        if key not in first:
            first[key] = len(unique)
            unique.append(list(ids))
            rows_of.append([])
        rows_of[first[key]].append(row)
    # longest prompts first: prompts prefilled together have similar lengths (little padding)
    queue = sorted(((u, rows) for u, rows in enumerate(rows_of)), key=lambda q: -len(unique[q[0]]))
    length = max(len(x) for x in unique) + max_new
    dtype = next(_inner(model).parameters()).dtype
    n_slots = slots or engine_slots(model, n_rows, length, device, dtype)
    cache = _SlotCache(len(runner.layers), n_slots, length)
    refill_at = max(1, n_slots // 8)
    # ---- a prefix every prompt shares (a chat template's system prompt): its KV once, for all
    p0 = min(len(os.path.commonprefix(unique)), min(len(x) for x in unique) - 1) if len(unique) > 1 else 0
    if p0 >= MIN_SHARED_PREFIX:
        runner.prefill_prefix(torch.tensor(unique[0][:p0], device=device), cache)

    # ---- outputs, by row
    out_tokens = torch.zeros(n_rows, max_new, dtype=torch.long)
    out_lengths = torch.zeros(n_rows, dtype=torch.long)
    out_ended = torch.zeros(n_rows, dtype=torch.bool)
    out_logps = torch.zeros(n_rows, max_new) if logprobs else None
    out_ent = torch.zeros(n_rows, max_new) if logprobs else None

    # ---- active slots 0..A−1: their row, next write position, tokens generated, last token
    slot_row = torch.zeros(0, dtype=torch.long)
    slot_pos = torch.zeros(0, dtype=torch.long)
    slot_gen = torch.zeros(0, dtype=torch.long)
    slot_tok = torch.zeros(0, dtype=torch.long)

    def record(logits: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Sample from logits [A, V] for ``rows`` at response step ``steps``; returns tokens [A]."""
        tok = _pick(logits, gen)
        tok_cpu = tok.cpu()
        out_tokens[rows, steps] = tok_cpu
        if logprobs:
            logp = logits.log_softmax(dim=-1)
            out_logps[rows, steps] = logp.gather(1, tok[:, None]).squeeze(1).cpu()
            out_ent[rows, steps] = -(logp.exp() * logp).sum(dim=-1).cpu()
        return tok_cpu

    while queue or slot_row.numel():
        # ---- refill free slots with waiting prompts, each prefilled once for its samples
        free = n_slots - slot_row.numel()
        if queue and (free >= refill_at or slot_row.numel() == 0):
            take, dest_rows, src = [], [], []
            width = len(unique[queue[0][0]]) if queue else 0  # the longest waiting prompt: first
            while queue and free > 0:
                u, rows = queue[0]
                if take and (len(take) + 1) * width > PREFILL_PADDING * sum(len(unique[x]) for x in take + [u]):
                    break  # the rest goes in another prefill: little padding in each
                now, later = rows[:free], rows[free:]
                if later:
                    queue[0] = (u, later)
                else:
                    queue.pop(0)
                src += [len(take)] * len(now)
                take.append(u)
                dest_rows += now
                free -= len(now)
            a = slot_row.numel()
            p0 = cache.p0
            lens = torch.tensor([len(unique[u]) - p0 for u in take])
            ids = torch.zeros(len(take), int(lens.max()), dtype=torch.long)
            for i, u in enumerate(take):  # right-padded: every prompt's rest starts at position p0
                ids[i, : lens[i]] = torch.tensor(unique[u][p0:])
            cache.src = torch.tensor(src, device=device)
            cache.dest = torch.arange(a, a + len(src), device=device)
            logits = runner.prefill(ids.to(device), lens.to(device), cache)[cache.src]
            rows_t = torch.tensor(dest_rows)
            tok = record(logits, rows_t, torch.zeros(len(src), dtype=torch.long))
            slot_row = torch.cat([slot_row, rows_t])
            slot_pos = torch.cat([slot_pos, lens[src] + p0])
            slot_gen = torch.cat([slot_gen, torch.ones(len(src), dtype=torch.long)])
            slot_tok = torch.cat([slot_tok, tok])
        else:
            # ---- one decoding step for every active slot
            logits = runner.decode(slot_tok.to(device), slot_pos.to(device), cache)
            slot_tok = record(logits, slot_row, slot_gen)
            slot_pos = slot_pos + 1
            slot_gen = slot_gen + 1
        # ---- rows that ended leave; the last active slots move into the holes
        eos = slot_tok == eos_id
        done = eos | (slot_gen >= max_new)
        if bool(done.any()):
            finished = slot_row[done]
            out_lengths[finished] = slot_gen[done]
            out_ended[finished] = eos[done]
            keep = ~done
            a_new = int(keep.sum())
            holes = torch.nonzero(done[:a_new]).squeeze(1)
            movers = torch.nonzero(keep[a_new:]).squeeze(1) + a_new
            if holes.numel():
                cache.move(holes.to(device), movers.to(device), int(slot_pos[movers].max()))
            perm = torch.arange(a_new)
            perm[holes] = movers
            slot_row, slot_pos, slot_gen, slot_tok = (x[perm] for x in (slot_row, slot_pos, slot_gen, slot_tok))
            if progress is not None:
                progress(int(finished.numel()))
    width = max(int(out_lengths.max()), 1)
    return (out_tokens[:, :width], out_lengths, out_ended,
            None if out_logps is None else out_logps[:, :width], None if out_ent is None else out_ent[:, :width])


@torch.no_grad()
def engine_stream(model, prompt_ids: list[int], max_new: int):
    """One sequence, a token at a time, for a server that picks each token itself.

    A generator: the first ``next()`` prefills ``prompt_ids`` and gives the logits [V]
    (float32) for the first new token; each ``send(token)`` feeds the picked token and gives
    the next logits. At most ``max_new`` tokens may be sent."""
    runner = _Runner(model)
    device = runner.device
    cache = _SlotCache(len(runner.layers), 1, len(prompt_ids) + max_new)
    cache.src = cache.dest = torch.zeros(1, dtype=torch.long, device=device)
    ids = torch.tensor([prompt_ids], device=device)
    logits = runner.prefill(ids, torch.tensor([len(prompt_ids)], device=device), cache)[0]
    pos = len(prompt_ids)
    for _ in range(max_new):
        token = yield logits
        logits = runner.decode(torch.tensor([int(token)], device=device), torch.tensor([pos], device=device), cache)[0]
        pos += 1


#: tokens one prefill pass of :func:`engine_last_logits` may hold (rows × padded width)
PREFILL_TOKENS = 8192


@torch.no_grad()
def engine_last_logits(model, prompt_ids: list[list[int]], progress=None) -> torch.Tensor:
    """Logits [B, V] (float32) of the token after each prompt: what a judge reads. A prefix
    every prompt shares (a rubric) runs once; the rest in passes of similar lengths."""
    runner = _Runner(model)
    device = runner.device
    out = torch.zeros(len(prompt_ids), runner.head.weight.size(0))
    if not prompt_ids:
        return out
    cache = _SlotCache(len(runner.layers), 0, max(len(x) for x in prompt_ids))  # nothing kept but the prefix
    p0 = min(len(os.path.commonprefix(prompt_ids)), min(len(x) for x in prompt_ids) - 1) if len(prompt_ids) > 1 else 0
    if p0 >= MIN_SHARED_PREFIX:
        runner.prefill_prefix(torch.tensor(prompt_ids[0][:p0], device=device), cache)
    p0 = cache.p0
    cache.src = cache.dest = torch.zeros(0, dtype=torch.long, device=device)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    b = 0
    while b < len(order):
        width = len(prompt_ids[order[b]]) - p0
        e = b + 1
        while e < len(order) and (e - b + 1) * width <= min(PREFILL_TOKENS, PREFILL_PADDING * sum(
                len(prompt_ids[i]) - p0 for i in order[b : e + 1])):
            e += 1
        rows = order[b:e]
        lens = torch.tensor([len(prompt_ids[i]) - p0 for i in rows])
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : lens[j]] = torch.tensor(prompt_ids[i][p0:])
        out[rows] = runner.prefill(ids.to(device), lens.to(device), cache).cpu()
        if progress is not None:
            progress(len(rows))
        b = e
    return out
