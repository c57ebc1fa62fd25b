"""Loading policies, reference, reward and value models, and the forward passes they share.

Policies are ``AutoModelForCausalLM``; reward and value models are
``AutoModelForSequenceClassification(num_labels=1)`` on the same backbone, initialised from
a causal-LM checkpoint (the SFT policy). With LoRA the trainable model is a peft model and
the reference is the same model with its adapters disabled (no second copy).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from tether.config import LoRAConfig, ModelConfig
from tether.data.io import atomic_directory
from tether.ops import token_logprobs
from tether.zoo import resolve_model

__all__ = [
    "load_tokenizer",
    "check_same_tokenizer",
    "load_policy",
    "load_scalar_model",
    "scalar_heads",
    "frozen_copy",
    "reference_context",
    "policy_logits",
    "sequence_logprobs",
    "token_states",
    "scalar_head",
    "token_scalars",
    "grouped_logprobs",
    "grouped_token_states",
    "grouped_token_scalars",
    "save_checkpoint",
    "position_ids_from_mask",
    "resolve_autocast",
    "autocast_context",
    "is_quantized",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(policy_tokenizer, other, what: str):
    """Refuse a model whose tokenizer differs from the policy's, before it scores the policy's
    token ids (e.g. ``monitor.heldout_rm``): ``other`` is a tokenizer or a zoo name, folder or
    hub id whose tokenizer is loaded (as :func:`load_tokenizer` does). Compares the vocabularies
    (``get_vocab()``, added tokens included) and the pad/eos/bos token ids. Returns the other
    tokenizer; raises :class:`~tether.config.ConfigError` naming ``what``, both tokenizers and
    the first difference."""
    from tether.config import ConfigError

    def name(tok, given=None) -> str:
        return str(given or getattr(tok, "name_or_path", "") or type(tok).__name__)

    given = None
    if isinstance(other, (str, Path)):
        given = str(other)
        try:
            other = load_tokenizer(given)
        except Exception as exc:  # transformers' own errors: OSError, ValueError, ...
            raise ConfigError(f"{what}: cannot load a tokenizer from {given}: {exc}") from None
    mine, theirs = name(policy_tokenizer), name(other, given)
    head = f"{what} ({theirs}) does not use the policy's tokenizer ({mine}): "
    tail = "; it would read the policy's token ids as other tokens (use a model built on the policy's tokenizer)"
    a, b = policy_tokenizer.get_vocab(), other.get_vocab()
    if a != b:
        if len(a) != len(b):
            detail = f"its vocabulary has {len(b)} tokens, the policy's {len(a)}"
        else:
            token = next(t for t in sorted(set(a) | set(b)) if a.get(t) != b.get(t))
            detail = f"token {token!r} has id {b.get(token)} there and {a.get(token)} in the policy's"
        raise ConfigError(head + detail + tail)
    for special in ("pad_token_id", "eos_token_id", "bos_token_id"):
        x, y = getattr(policy_tokenizer, special, None), getattr(other, special, None)
        if x != y:
            raise ConfigError(head + f"{special} is {y} there and {x} in the policy's" + tail)
    return other


def _lora_config(lora: LoRAConfig, task_type: str):
    from peft import LoraConfig

    targets = lora.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
    )


def _device(model_cfg: ModelConfig) -> torch.device:
    from tether.distributed import device_for_rank

    return device_for_rank(getattr(model_cfg, "device", "auto"))


def _quantized(lora: LoRAConfig | None) -> bool:
    return lora is not None and lora.enabled and getattr(lora, "quantize", "none") != "none"


def _from_pretrained(auto_class, name: str, model_cfg: ModelConfig, lora: LoRAConfig | None, **kwargs):
    """``auto_class.from_pretrained`` on this process's device; with QLoRA the base weights
    are quantised by bitsandbytes as they load and prepared for adapter training (norms
    and head in float32, input gradients on for the adapters)."""
    device = _device(model_cfg)
    if not _quantized(lora):
        return auto_class.from_pretrained(resolve_model(name), dtype=_DTYPES[model_cfg.dtype], **kwargs).to(device)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        from tether.config import ConfigError

        raise ConfigError("lora.quantize: needs bitsandbytes (pip install 'tether[qlora]')") from None
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[lora.compute_dtype]
    if lora.quantize == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    model = auto_class.from_pretrained(resolve_model(name), dtype=_DTYPES[model_cfg.dtype], quantization_config=bnb,
                                       device_map={"": device}, **kwargs)
    for module in model.modules():
        # bitsandbytes (0.50) repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first
        # eval-mode pass, for good; that kernel has no backward, so the training passes after
        # it would stop the gradient at every layer (it warns "gemv_4bit ... backprop")
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def is_quantized(model) -> bool:
    """Whether ``model`` (or the model under its peft wrapper) holds bitsandbytes weights."""
    inner = _unwrap(model)
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False)
                or getattr(getattr(inner, "config", None), "quantization_config", None))


def load_policy(name: str, model_cfg: ModelConfig, lora: LoRAConfig | None = None, *, trainable: bool = True):
    """A causal LM from a zoo name, folder or hub id; wrapped with LoRA when ``lora.enabled``
    (QLoRA: on a 4-bit base, ``lora.quantize``)."""
    from transformers import AutoModelForCausalLM

    quantize = _quantized(lora) and trainable
    model = _from_pretrained(AutoModelForCausalLM, name, model_cfg, lora if quantize else None)
    if quantize:
        model._tether_source = {"name": str(name), "kind": "causal", "dtype": model_cfg.dtype}
    if lora is not None and lora.enabled and trainable:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora, "CAUSAL_LM"))
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def scalar_heads(name: str) -> int:
    """Outputs of the ``score`` head a checkpoint holds: its ``num_labels`` when it is a
    sequence-classification (reward) checkpoint, else 1."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name))
    archs = getattr(config, "architectures", None) or []
    return int(config.num_labels) if any(a.endswith("ForSequenceClassification") for a in archs) else 1


def load_scalar_model(name: str, model_cfg: ModelConfig, lora: LoRAConfig | None = None, *,
                      pad_token_id: int | None = None, num_labels: int | None = 1):
    """A reward/value model: ``AutoModelForSequenceClassification(num_labels)``.

    Loaded from a causal-LM checkpoint the backbone weights are reused and the head
    (``score``) starts from a small random init; from a reward checkpoint everything loads.
    ``num_labels`` > 1 gives an ensemble of heads on one backbone; None keeps the number a
    reward checkpoint has (1 for any other checkpoint). A head of another size than the
    checkpoint's starts afresh (e.g. a one-output value model from an ensemble RM).
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    stored = scalar_heads(name)
    if num_labels is None:
        num_labels = stored
    collapse = num_labels == 1 and stored > 1  # one output from an ensemble: the mean of its heads
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights newly initialised" is expected here
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, name, model_cfg, lora,
                                 num_labels=stored if collapse else num_labels, ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if _quantized(lora):
        model._tether_source = {"name": str(name), "kind": "scalar", "dtype": model_cfg.dtype,
                                "num_labels": stored if collapse else num_labels}
    if collapse:
        head = model.score
        mean = torch.nn.Linear(head.in_features, 1, bias=head.bias is not None, dtype=head.weight.dtype)
        with torch.no_grad():
            mean.weight.copy_(head.weight.mean(dim=0, keepdim=True))
            if head.bias is not None:
                mean.bias.copy_(head.bias.mean().reshape(1))
        model.score = mean
        model.config.num_labels = model.num_labels = 1
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if lora is not None and lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(lora, "SEQ_CLS"))
    return model


def frozen_copy(model):
    """A frozen deep copy (the reference policy when training all weights)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


@contextlib.contextmanager
def reference_context(policy, reference):
    """Yields the model to use as the reference: ``reference``, or — when it is None and
    ``policy`` is a peft model — ``policy`` itself with its adapters disabled."""
    if reference is not None:
        yield reference
        return
    if not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference model given and the policy has no LoRA adapters to disable")
    with policy.disable_adapter():
        yield policy


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) − 1, clamped at 0. [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    inner = _unwrap(model)
    cached = getattr(inner, "_tether_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(inner.forward).parameters
        inner._tether_logits_to_keep = cached
    return cached


def policy_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits of a causal LM, with position ids that respect left padding.

    ``keep=N`` asks for the logits of the last N positions only ([B, N, V]): the LM head
    (49k-word vocabularies make it a fifth of a small model's compute) then skips the
    prompt. Models whose forward has no ``logits_to_keep`` return all positions, sliced.
    """
    kwargs = {}
    if keep is not None and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )
    logits = out.logits
    if keep is not None and logits.size(1) != keep:
        logits = logits[:, -keep:]
    return logits


def resolve_autocast(mode: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype for ``model.autocast``: ``auto`` picks bfloat16 where the hardware
    runs it natively (CPUs with AVX512-BF16/AMX, CUDA GPUs with bf16), else none."""
    device = torch.device(device)
    if mode == "off":
        return None
    if mode in ("bfloat16", "float16"):
        return _DTYPES[mode]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):
            return None
    return None


def autocast_context(mode: str, device: torch.device | str = "cpu"):
    """``torch.autocast`` for ``model.autocast`` (a no-op context when it resolves to none).

    Weights, optimiser state and losses stay float32; matrix products run in the low
    precision dtype. On a CPU with AVX512-BF16 this makes LoRA training 1.4-3x faster.

    The cast cache is off: a whole stage runs inside one context, and autocast's cache
    would keep the low-precision copy of every trainable weight made at its first use for
    the context's lifetime — forward passes would never see an optimiser step.
    """
    dtype = resolve_autocast(mode, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=False)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    *,
    return_logits: bool = False,
    return_hidden: bool = False,
):
    """Log-probs of tokens ``input_ids[:, start:]`` under ``model``, shape [B, L − start].

    ``start`` is the column where the responses begin (prompts left-padded to ``start``).
    With ``return_logits`` also returns the aligned logits [B, L − start, V]; with
    ``return_hidden`` (last) the hidden states the LM head read at those positions
    [B, L − start, H] — the state before each response token, for a value head.
    """
    keep = input_ids.size(1) - start + 1
    captured: list[torch.Tensor] = []
    handle = None
    if return_hidden:
        head = _unwrap(model).get_output_embeddings()
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits = policy_logits(model, input_ids, attention_mask, keep=keep)[:, :-1]
    finally:
        if handle is not None:
            handle.remove()
    logps = token_logprobs(logits, input_ids[:, start:])
    out = (logps, logits) if return_logits else (logps,)
    if return_hidden:
        out = (*out, captured[-1][:, -keep:][:, :-1])
    return out if len(out) > 1 else out[0]


def _unwrap(model):
    """The transformers model under a peft wrapper (adapters stay active in place)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def token_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states [B, L, D] of a sequence-classification model's backbone (what
    its scalar head reads), positions from the mask (left or right padding)."""
    inner = _unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    return backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


def scalar_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's ``score`` head on states [..., D]: [...] ([..., H] for H heads), float32
    (float64 in a float64 model), computed in the head's own precision even under autocast."""
    inner = _unwrap(model)
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no 'score' head; use a decoder model whose "
                         "AutoModelForSequenceClassification class names its head 'score'")
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        out = head(hidden.to(head.weight.dtype)).squeeze(-1)
    return out if out.dtype == torch.float64 else out.float()


def token_scalars(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head applied at every position of a sequence-classification model: [B, L]
    ([B, L, H] for a head with H > 1 outputs, an ensemble).

    Used for values (every position) and rewards (gathered at the last token), without
    relying on the model's own pad-token pooling (which breaks when pad == eos).
    """
    return scalar_head(model, token_states(model, input_ids, attention_mask))


# --------------------------------------------------------------------------- shared prompts
#
# K responses to one prompt (a ranking for the reward model, G samples of a prompt in PPO)
# repeat the prompt K times. Running the prompt once and repeating its KV cache for the K
# responses gives the same outputs and gradients (the prompt's states are identical in every
# copy, and the cache repetition passes the K gradients back to them) for a fraction of the
# compute: with 65-token prompts and 35-token responses, K = 4 needs half the tokens.


def _cache_argument(module) -> str:
    import inspect

    inner = _unwrap(module)  # a peft wrapper's forward takes **kwargs
    cached = getattr(inner, "_tether_cache_arg", None)
    if cached is None:
        params = inspect.signature(inner.forward).parameters
        cached = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        inner._tether_cache_arg = cached
    return cached


def split_prompt_forward(module, query_ids, query_mask, response_ids, response_mask, group: int,
                         query_kwargs: dict | None = None):
    """Forward passes of ``module`` over rows ``[query | response]`` that come in groups of
    ``group`` consecutive rows sharing one query: each query once, then the responses on
    its KV cache repeated ``group`` times.

    Args:
        query_ids, query_mask: [B, P] left-padded queries, equal within each group.
        response_ids, response_mask: [B, W] right-padded responses.
        query_kwargs: extra arguments of the query pass (e.g. ``logits_to_keep``).

    Returns ``(query_out, response_out)``: the module's outputs for the B / group queries
    and for the B responses.
    """
    batch = query_ids.size(0)
    if group < 1 or batch % group:
        raise ValueError(f"{batch} rows do not split into groups of {group}")
    q_ids, q_mask = query_ids[::group], query_mask[::group]
    same = (query_ids.view(-1, group, query_ids.size(1)) == q_ids.unsqueeze(1)).all()
    same = same and (query_mask.view(-1, group, query_mask.size(1)) == q_mask.unsqueeze(1)).all()
    if not same:
        raise ValueError(f"rows in a group of {group} must share one query (same token ids and mask)")
    first = int(q_mask.float().argmax(dim=1).min())  # columns that are padding in every query
    q_ids, q_mask = q_ids[:, first:], q_mask[:, first:]
    arg = _cache_argument(module)
    q_out = module(input_ids=q_ids, attention_mask=q_mask, position_ids=position_ids_from_mask(q_mask),
                   use_cache=True, **(query_kwargs or {}))
    cache = getattr(q_out, "past_key_values", None)
    if cache is None:
        cache = q_out.cache
    cache.batch_repeat_interleave(group)
    mask = torch.cat([q_mask.repeat_interleave(group, dim=0), response_mask.to(q_mask.dtype)], dim=1)
    lengths = q_mask.long().sum(dim=1, keepdim=True).repeat_interleave(group, dim=0)
    positions = lengths + torch.arange(response_ids.size(1), device=response_ids.device).unsqueeze(0)
    r_out = module(input_ids=response_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{arg: cache})
    return q_out, r_out


def grouped_logprobs(model, query_ids, query_mask, response_ids, response_mask, group: int, *,
                     return_logits: bool = False, return_hidden: bool = False):
    """:func:`sequence_logprobs` of ``[query | response]`` rows whose queries repeat in groups
    of ``group`` (see :func:`split_prompt_forward`): log-probs [B, W] of the response
    tokens, and optionally the aligned logits [B, W, V] and the LM head's input states
    [B, W, H] (the state before each response token)."""
    captured: list[torch.Tensor] = []
    handle = None
    if return_hidden:
        head = _unwrap(model).get_output_embeddings()
        handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    try:
        q_out, r_out = split_prompt_forward(model, query_ids, query_mask, response_ids, response_mask, group, kwargs)
    finally:
        if handle is not None:
            handle.remove()
    first = q_out.logits[:, -1:].repeat_interleave(group, dim=0)
    logits = torch.cat([first, r_out.logits[:, :-1]], dim=1)
    logps = token_logprobs(logits, response_ids)
    out = (logps, logits) if return_logits else (logps,)
    if return_hidden:
        q_hidden, r_hidden = captured[0], captured[-1]
        hidden = torch.cat([q_hidden[:, -1:].repeat_interleave(group, dim=0), r_hidden[:, :-1]], dim=1)
        out = (*out, hidden)
    return out if len(out) > 1 else out[0]


def grouped_token_states(model, query_ids, query_mask, response_ids, response_mask, group: int) -> torch.Tensor:
    """:func:`token_states` over ``[query | response]`` rows whose queries repeat in groups of
    ``group``: [B, 1 + W, D], the query's last state followed by one per response token."""
    inner = _unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    q_out, r_out = split_prompt_forward(backbone, query_ids, query_mask, response_ids, response_mask, group)
    return torch.cat([q_out.last_hidden_state[:, -1:].repeat_interleave(group, dim=0), r_out.last_hidden_state], dim=1)


def grouped_token_scalars(model, query_ids, query_mask, response_ids, response_mask, group: int) -> torch.Tensor:
    """:func:`token_scalars` of a sequence-classification model over ``[query | response]``
    rows whose queries repeat in groups of ``group``: [B, 1 + W], the scalar at the query's
    last token followed by one per response token (values: ``[:, :-1]``; a response's
    score: ``[:, its length]``)."""
    return scalar_head(model, grouped_token_states(model, query_ids, query_mask, response_ids, response_mask, group))


def _merged_full_precision(model):
    """A QLoRA model's adapters merged into its base weights loaded again in full precision
    (merging into 4-bit weights would round the adapters away): a plain model on the CPU."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    inner = _unwrap(model)
    source = getattr(inner, "_tether_source", None)
    if source is None:
        raise ValueError("a quantised model not loaded by tether.models cannot be merged into a full-precision base")
    cfg = ModelConfig(name=source["name"], dtype=source["dtype"], device="cpu")
    if source["kind"] == "causal":
        base = _from_pretrained(AutoModelForCausalLM, source["name"], cfg, None)
    else:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            base = _from_pretrained(AutoModelForSequenceClassification, source["name"], cfg, None,
                                    num_labels=source["num_labels"], ignore_mismatched_sizes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        base.config.pad_token_id = inner.config.pad_token_id
    peft_cfg = copy.deepcopy(model.peft_config[model.active_adapter])
    full = get_peft_model(base, peft_cfg)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(full, state)
    merged = full.merge_and_unload()
    merged.config.quantization_config = None
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    return merged


def save_checkpoint(model, tokenizer, dest: str | Path) -> Path:
    """Save a plain HF checkpoint (weights + config + tokenizer) atomically.

    peft models are merged into their base weights first, so transformers alone loads
    the result. Written into a temporary folder beside ``dest`` and renamed into place.
    """
    dest = Path(dest)
    to_save = model
    if hasattr(model, "merge_and_unload") and is_quantized(model):
        to_save = _merged_full_precision(model)
    elif hasattr(model, "merge_and_unload"):
        to_save = copy.deepcopy(model).merge_and_unload()
    with atomic_directory(dest) as tmp:
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest
