"""``tether serve CHECKPOINT``: any checkpoint behind an OpenAI-compatible chat API.

    tether serve runs/default/ppo            # a run's stage folder (uses its checkpoint/)
    tether serve smollm2-135m-instruct --port 8001
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 32}'

Routes: ``GET /health``, ``GET /v1/models`` and ``POST /v1/chat/completions`` (non-streaming
or Server-Sent Events with ``"stream": true``). Supported request fields: ``messages``,
``model`` (any value is accepted; responses name the served model), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed``, ``stop``,
``n`` (1 only), ``stream``, ``stream_options.include_usage``, ``logprobs`` and
``top_logprobs`` (0..20). Other OpenAI fields are ignored. Bad requests get a 400 with
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

Log-probabilities are the log-softmax of the raw model logits (before temperature or
top-p), so ``max_tokens=1, logprobs=true, top_logprobs=5`` reads the model's next-token
distribution, e.g. P("A") against P("B") for a judge.

``max_tokens`` defaults to, and is capped at, ``max_new_tokens_limit`` (1024) and the room
the model's context leaves after the prompt; a prompt that fills the context is a 400.

One model serves one request at a time (a lock around generation); generation is a plain
token loop over the KV cache, which yields text as it is decoded, so streaming is
incremental. A streamed generation runs in its own thread and stops when its client
disconnects. Stop strings are never streamed: text that could be the start of a stop
string is held back until it is known not to be.

Tests and the HTTP judge start a real server with :func:`serve_in_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "ChatModel",
    "ChatRequest",
    "RequestError",
    "cmd_serve",
    "create_app",
    "parse_chat_request",
    "prompt_ids",
    "resolve_checkpoint",
    "serve_in_thread",
]

ROLES = ("system", "user", "assistant")
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


# --------------------------------------------------------------------------------------
# requests


class RequestError(Exception):
    """A client error, answered with OpenAI's error body and ``status``."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_bool(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false, got {value!r}", key)
    return value


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise RequestError(f"'{key}' must be a number, got {value!r}", key)
    if value > hi or value < lo or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise RequestError(f"'{key}' must be {low} and <= {hi}, got {value}", key)
    return float(value)


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    param = f"messages[{i}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"'{param}': only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                   f"supported, got {part!r}", param)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"'{param}' must be a string, got {type(content).__name__}", param)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raise :class:`RequestError` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"'messages[{i}]' must be an object with 'role' and 'content'", f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}",
                               f"messages[{i}].role")
        parsed.append({"role": role, "content": _content(message, i)})

    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"only n=1 is supported, got n={n!r}", "n")

    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise RequestError(f"'{key}' must be an integer >= 1, got {max_tokens!r}", key)

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer, got {seed!r}", "seed")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")

    logprobs = _optional_bool(body, "logprobs")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if not (_is_int(top_logprobs) and 0 <= top_logprobs <= MAX_TOP_LOGPROBS):
            raise RequestError(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs!r}",
                               "top_logprobs")
        if not logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")

    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))

    return ChatRequest(
        messages=parsed,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
    )


# --------------------------------------------------------------------------------------
# the model


def resolve_checkpoint(checkpoint: str) -> str:
    """A zoo name, a model folder, a run's stage folder holding ``checkpoint/``, or a hub id
    → something ``from_pretrained`` accepts."""
    from tether.zoo import resolve_model

    path = Path(checkpoint).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        return str(path / "checkpoint")
    try:
        return resolve_model(checkpoint)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; pass a model folder, a run's stage folder with a checkpoint/ "
                                "inside (e.g. runs/default/ppo), or a zoo name") from None


def default_model_name(checkpoint: str) -> str:
    """The id the API reports: a zoo name as is, else the folder's name (``runs/x/ppo`` → ``ppo``)."""
    from tether.zoo import ZOO

    if checkpoint in ZOO:
        return checkpoint
    path = Path(checkpoint).expanduser()
    if not path.exists():
        return checkpoint  # a hub id
    parts = [p for p in path.resolve().parts if p not in ("checkpoint", "/")]
    return parts[-1] if parts else checkpoint


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt as tether renders it everywhere (:func:`tether.data.tokenize.chat_prompt_ids`)."""
    from tether.data.tokenize import chat_prompt_ids

    return chat_prompt_ids(tokenizer, messages)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: printable character → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class Piece:
    """A stretch of generated text, the log-prob entries of the tokens that produced it, and
    (on the last piece) why generation finished."""

    text: str
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0  # on the last piece: tokens sampled, an end-of-sequence token included


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    keep = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:k]):
                keep = k
                break
    return keep


class ChatModel:
    """A causal LM and its tokenizer, generating one request at a time."""

    def __init__(self, checkpoint: str, *, device: str | None = None):
        from transformers import AutoModelForCausalLM

        from tether.models import _cache_argument, load_tokenizer

        self.path = resolve_checkpoint(checkpoint)
        try:
            self.tokenizer = load_tokenizer(self.path)
            model = AutoModelForCausalLM.from_pretrained(self.path)
        except OSError as exc:
            raise FileNotFoundError(f"{checkpoint}: could not load a model and tokenizer from {self.path}: {exc}") from exc
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.lock = threading.Lock()
        self.context = getattr(model.config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = {int(i) for i in eos}
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache_arg = _cache_argument(self.model)  # "cache" or (before transformers 5.x) "past_key_values"
        takes = inspect.signature(self.model.forward).parameters
        self._last_logit_only = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        self._bytes_of_char = _byte_decoder() if self._byte_level else {}

    # ---- tokens as the API shows them

    def token_text(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token], clean_up_tokenization_spaces=False)
        return self._token_text[token]

    def token_bytes(self, token: int) -> list[int]:
        """The token's UTF-8 bytes; for byte-level BPE and ``<0xNN>`` byte fallbacks, the raw
        bytes even when they are part of a multi-byte character."""
        if token not in self._token_bytes:
            raw = self.tokenizer.convert_ids_to_tokens(token)
            out = None
            if raw is not None and self._byte_level and all(c in self._bytes_of_char for c in raw) \
                    and token not in self.tokenizer.all_special_ids:
                out = [self._bytes_of_char[c] for c in raw]
            elif raw is not None and (m := _BYTE_FALLBACK.match(raw)):
                out = [int(m.group(1), 16)]
            self._token_bytes[token] = out if out is not None else list(self.token_text(token).encode("utf-8"))
        return self._token_bytes[token]

    def _entry(self, token: int, logprob: float) -> dict:
        return {"token": self.token_text(token), "logprob": logprob, "bytes": self.token_bytes(token)}

    def logprob_entry(self, logprobs: torch.Tensor, token: int, top: int) -> dict:
        entry = self._entry(token, float(logprobs[token]))
        if top:
            values, ids = torch.topk(logprobs, min(top, logprobs.numel()))
            entry["top_logprobs"] = [self._entry(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        else:
            entry["top_logprobs"] = []
        return entry

    # ---- generation

    def max_new_tokens(self, n_prompt: int, requested: int | None, limit: int) -> int:
        """How many tokens a request may generate; a 400 when the prompt fills the context."""
        budget = min(requested or limit, limit)
        if self.context is not None:
            room = self.context - n_prompt
            if room < 1:
                raise RequestError(f"the prompt is {n_prompt} tokens but the model's context is {self.context} tokens",
                                   "messages")
            budget = min(budget, room)
        return budget

    def _pick(self, logits: torch.Tensor, request: ChatRequest, generator: torch.Generator) -> int:
        if request.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / request.temperature, dim=-1)
        if request.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest head of the distribution whose mass reaches top_p
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= request.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))

    def generate(self, ids: list[int], request: ChatRequest, max_new_tokens: int, *,
                 cancel: threading.Event | None = None) -> Iterator[Piece]:
        """Generate from prompt ``ids``, yielding text as it becomes final; the last piece
        carries ``finish_reason`` ("stop": end of sequence or a stop string; "length").

        The caller holds :attr:`lock`. Text held back (an undecodable byte tail, a possible
        stop-string prefix) and the log-probs of its tokens come with a later piece. Setting
        ``cancel`` ends generation before the next token, without a last piece.
        """
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        stops = request.stop
        decode_kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        tokens: list[int] = []
        text = ""
        emitted = 0  # characters of ``text`` already yielded
        pending: list[tuple[int, dict]] = []  # (start offset in text, log-prob entry)

        def take(end: int, finish: str | None = None, n_sampled: int = 0) -> Piece:
            """Text up to ``end`` and the entries of tokens starting before it (all, when finishing
            without a stop string)."""
            nonlocal emitted, pending
            everything = finish is not None and end == len(text)
            done = [e for start, e in pending if start < end or everything]
            pending = [(s, e) for s, e in pending if not (s < end or everything)]
            piece = Piece(text[emitted:end], done, finish, n_sampled)
            emitted = max(emitted, end)
            return piece

        steps = self._steps(ids, max_new_tokens)
        logits = None
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                logits = next(steps) if logits is None else steps.send(token)
                token = self._pick(logits, request, generator)
                if token in self.eos_ids:
                    yield take(len(text), "stop", len(tokens) + 1)
                    return
                start = len(text)
                tokens.append(token)
                text = self.tokenizer.decode(tokens, **decode_kwargs)
                if request.logprobs:
                    pending.append((start, self.logprob_entry(torch.log_softmax(logits, -1), token,
                                                              request.top_logprobs)))
                hits = [i for i in (text.find(s, emitted) for s in stops) if i >= 0]
                if hits:
                    yield take(min(hits), "stop", len(tokens))
                    return
                safe = len(text) - _held_back(text, stops)
                while safe > emitted and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
                    safe -= 1
                if safe > emitted:
                    yield take(safe)
        yield take(len(text), "length", len(tokens))

    def _steps(self, ids: list[int], max_new_tokens: int) -> Iterator[torch.Tensor]:
        """Logits [V] (float32) of each next token; ``send(token)`` feeds the picked one. Tether's
        engine (its slot KV cache, logits of the last position only) for a Llama-shaped model,
        else the model's own forward with its KV cache."""
        from tether.rollout.engine import engine_stream, engine_supports

        if engine_supports(self.model):
            return engine_stream(self.model, ids, max_new_tokens)
        return self._hf_steps(ids, max_new_tokens)

    def _hf_steps(self, ids: list[int], max_new_tokens: int) -> Iterator[torch.Tensor]:
        inputs = torch.tensor([ids], device=self.device)
        step_kwargs = dict(self._last_logit_only)
        for _ in range(max_new_tokens):
            out = self.model(input_ids=inputs, use_cache=True, **step_kwargs)
            cache = getattr(out, "cache", None)  # named past_key_values before transformers 5.x
            step_kwargs[self._cache_arg] = cache if cache is not None else out.past_key_values
            token = yield out.logits[0, -1].float()
            inputs = torch.tensor([[int(token)]], device=self.device)


# --------------------------------------------------------------------------------------
# the app


class _EventStream(StreamingResponse):
    """A streaming response that closes its body iterator however the response ends: a
    client that disconnects mid-stream makes the send fail, and Starlette alone would leave
    the iterator (and the generation behind it) suspended until garbage collection."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def create_app(checkpoint: str, *, model_name: str | None = None, max_new_tokens_limit: int = 1024,
               device: str | None = None) -> FastAPI:
    """A FastAPI app serving ``checkpoint`` (see the module docstring for the API).

    ``max_new_tokens_limit`` caps every request's ``max_tokens`` (and is the default when a
    request gives none); the model's context length caps it too. ``app.state.chat`` is the
    :class:`ChatModel`.
    """
    if max_new_tokens_limit < 1:
        raise ValueError(f"max_new_tokens_limit must be >= 1, got {max_new_tokens_limit}")
    chat = ChatModel(checkpoint, device=device)
    name = model_name or default_model_name(checkpoint)
    started = int(time.time())

    app = FastAPI(title=f"tether serve: {name}", description="OpenAI-compatible chat completions")
    app.state.chat = chat
    app.state.model_name = name

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": f"{exc.detail}: {request.method} {request.url.path}",
                                       "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "tether"}]}

    def prepare(request: ChatRequest) -> tuple[list[int], int]:
        from tether.data.schemas import ChatFormatError

        try:
            ids = prompt_ids(chat.tokenizer, request.messages)
        except ChatFormatError as exc:  # e.g. a chat template without a system role
            raise RequestError(str(exc), exc.field or "messages") from None
        return ids, chat.max_new_tokens(len(ids), request.max_tokens, max_new_tokens_limit)

    def complete(request: ChatRequest, ids: list[int], budget: int) -> dict:
        text, entries, finish, n_tokens = [], [], "length", 0
        with chat.lock:
            for piece in chat.generate(ids, request, budget):
                text.append(piece.text)
                entries.extend(piece.logprobs)
                finish, n_tokens = piece.finish_reason or finish, piece.completion_tokens
        return {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": None,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "logprobs": {"content": entries} if request.logprobs else None,
                "finish_reason": finish,
            }],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n_tokens,
                      "total_tokens": len(ids) + n_tokens},
        }

    async def stream(request: ChatRequest, ids: list[int], budget: int) -> AsyncIterator[str]:
        """Server-Sent Events of a generation that runs in its own thread (holding the lock)
        and hands pieces over through a queue; closing this iterator (the client went away)
        stops that thread before its next token."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                cancel.set()

        def work() -> None:
            try:
                while not chat.lock.acquire(timeout=0.1):
                    if cancel.is_set():
                        return
                try:
                    for piece in chat.generate(ids, request, budget, cancel=cancel):
                        put(piece)
                finally:
                    chat.lock.release()
            except Exception as exc:  # noqa: BLE001 -- the status line is sent; tell the client in the stream
                put(exc)
            finally:
                put(None)

        base = {"id": _completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": name, "system_fingerprint": None}

        def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
            choice = {"index": 0, "delta": delta,
                      "logprobs": {"content": logprobs} if request.logprobs and logprobs is not None else None,
                      "finish_reason": finish}
            body = {**base, "choices": [choice]}
            if request.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        threading.Thread(target=work, name="tether-serve-generate", daemon=True).start()
        try:
            yield chunk({"role": "assistant", "content": ""})
            finish, n_tokens = "length", 0
            while (piece := await pieces.get()) is not None:
                if isinstance(piece, Exception):
                    error = {"error": {"message": f"generation failed: {piece}", "type": "server_error",
                                       "param": None, "code": None}}
                    yield f"data: {json.dumps(error)}\n\n"
                    return
                if piece.text or piece.logprobs:
                    yield chunk({"content": piece.text}, logprobs=piece.logprobs)
                finish, n_tokens = piece.finish_reason or finish, piece.completion_tokens
            yield chunk({}, finish)
            if request.include_usage:
                usage = {"prompt_tokens": len(ids), "completion_tokens": n_tokens,
                         "total_tokens": len(ids) + n_tokens}
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        raw = await http_request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        request = parse_chat_request(body)
        ids, budget = await run_in_threadpool(prepare, request)
        if request.stream:
            return _EventStream(stream(request, ids, budget), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run_in_threadpool(complete, request, ids, budget)

    return app


# --------------------------------------------------------------------------------------
# running a server


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                    timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its OpenAI base URL
    (``http://HOST:PORT/v1``). ``port=0`` picks a free port. The server stops on exit.

        with serve_in_thread(create_app("tiny")) as base_url:
            httpx.post(f"{base_url}/chat/completions", json={...})
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from exc
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"the server on {host}:{port} exited while starting")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server on {host}:{port} did not start within {timeout:.0f}s")
            time.sleep(0.01)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        yield f"http://{shown}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def cmd_serve(args) -> int:
    """Load the checkpoint, print how to reach it, and serve until interrupted."""
    import uvicorn

    host = getattr(args, "host", None) or "127.0.0.1"
    port = getattr(args, "port", None) or 8000
    app = create_app(args.checkpoint, model_name=getattr(args, "model_name", None),
                     max_new_tokens_limit=getattr(args, "max_tokens_limit", None) or 1024,
                     device=getattr(args, "device", None))
    name = app.state.model_name
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}/v1"
    print(f"serving {name} ({app.state.chat.path}) on {app.state.chat.device}")
    print(f"OpenAI base URL: {base}")
    print("try:")
    print(f"  curl {base}/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
          f"\"max_tokens\": 32}}'")
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
