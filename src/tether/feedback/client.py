"""A client for OpenAI-compatible ``/v1/chat/completions`` endpoints.

What an AI judge or a critique–revise loop needs from a remote model, and nothing home-made
beneath it (httpx does the HTTP):

- a **timeout** per request, and **retries** with exponential backoff (and jitter, and the
  server's ``Retry-After`` when it sends one) on timeouts, lost connections, HTTP 429 and
  5xx, and malformed responses; other 4xx errors are the request's fault and fail at once;
- a **concurrency limit**: at most ``concurrency`` requests in flight;
- an **on-disk cache** (SQLite, keyed by the URL, the model and the request body), so a
  rerun never pays twice. Only a complete, well-formed response is stored, and each is
  committed on its own, so a run that fails half-way keeps what it already paid for;
- errors that say which URL, what happened and after how many attempts.

The key is read from the environment (``api_key_env``, default ``OPENAI_API_KEY``); none is
needed for a local server such as ``tether serve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["ChatClient", "ChatError", "ResponseCache", "default_cache_path"]


class ChatError(RuntimeError):
    """A request that failed for good (after its retries), with the URL and the reason."""


def default_cache_path() -> Path:
    from tether.zoo import tether_home

    return tether_home() / "chat_cache.sqlite"


class ResponseCache:
    """Responses by key in one SQLite file (safe across threads and processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT NOT NULL, "
                       "created REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def get(self, key: str) -> dict | None:
        with self._lock, self._connect() as db:
            row = db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, body: dict) -> None:
        with self._lock, self._connect() as db:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, json.dumps(body), time.time()))

    def __len__(self) -> int:
        with self._lock, self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])


def _validate(body) -> str | None:
    """Why ``body`` is not a chat completion (None when it is one)."""
    if not isinstance(body, dict):
        return f"expected a JSON object, got {type(body).__name__}"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return "no 'choices' list"
    message = choices[0].get("message")
    if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
        return "no 'choices[0].message.content'"
    return None


class ChatClient:
    """``complete(bodies)``: POST each request body to ``{base_url}/chat/completions``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the ``model`` field of every request.
        api_key_env: environment variable holding the bearer key (unset: no key sent).
        timeout: seconds per attempt (connect, read and write each).
        max_retries: further attempts after the first on a retryable failure.
        backoff: first wait in seconds; doubles each retry (with ±50% jitter), capped at 30 s.
        concurrency: requests in flight at most.
        cache: a SQLite path, None for the default (``$TETHER_HOME/chat_cache.sqlite``),
            or False for no cache.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 0.5, concurrency: int = 4,
                 cache: str | Path | None | bool = None):
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout, self.max_retries, self.backoff, self.concurrency = timeout, max_retries, backoff, concurrency
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(timeout=httpx.Timeout(timeout), headers=headers,
                                  limits=httpx.Limits(max_connections=concurrency))
        self.cache = None if cache is False else ResponseCache(default_cache_path() if cache in (None, True) else cache)
        self.stats = {"requests": 0, "cached": 0, "retries": 0, "failed": 0}
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def key(self, body: dict) -> str:
        """The cache key: the endpoint, the model name and the request body. A model retrained
        under the same name behind the same URL needs a fresh cache (or another name)."""
        return hashlib.sha256(json.dumps({"url": self.url, "model": self.model, **body}, sort_keys=True,
                                         ensure_ascii=False).encode()).hexdigest()

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def complete_one(self, body: dict) -> dict:
        """One request (``model`` is added), from the cache when it is there."""
        import httpx

        body = {"model": self.model, **body}
        key = self.key({k: v for k, v in body.items() if k != "model"})
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count("cached")
            return hit
        attempts = self.max_retries + 1
        reason = ""
        for attempt in range(1, attempts + 1):
            self._count("requests")
            retry_after = None
            try:
                resp = self._http.post(self.url, json=body)
            except httpx.TimeoutException:
                reason = f"timed out after {self.timeout:g} s"
            except httpx.TransportError as exc:
                reason = f"connection failed ({type(exc).__name__}: {exc})"
            else:
                if resp.status_code == 200:
                    try:
                        parsed = resp.json()
                    except ValueError:
                        reason = f"malformed JSON in the response: {resp.text[:200]!r}"
                    else:
                        problem = _validate(parsed)
                        if problem is None:
                            if self.cache is not None:
                                self.cache.put(key, parsed)
                            return parsed
                        reason = f"not a chat completion ({problem}): {resp.text[:200]!r}"
                elif resp.status_code == 429 or resp.status_code >= 500:
                    reason = f"HTTP {resp.status_code}: {resp.text[:200]!r}"
                    retry_after = resp.headers.get("retry-after")
                else:
                    self._count("failed")
                    raise ChatError(f"POST {self.url}: HTTP {resp.status_code} (not retried): {resp.text[:300]!r}")
            if attempt < attempts:
                self._count("retries")
                wait = min(30.0, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if retry_after:
                    try:
                        wait = max(wait, min(60.0, float(retry_after)))
                    except ValueError:
                        pass
                time.sleep(wait)
        self._count("failed")
        raise ChatError(f"POST {self.url}: {reason} (gave up after {attempts} attempt{'s' * (attempts > 1)})")

    def complete(self, bodies: list[dict], progress=None) -> list[dict]:
        """All requests, ``concurrency`` at a time; results in order. The first failure is
        raised once the requests in flight have finished (their answers are cached)."""
        if self.concurrency == 1 or len(bodies) <= 1:
            out = []
            for b in bodies:
                out.append(self.complete_one(b))
                if progress:
                    progress(1)
            return out
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(self.complete_one, b) for b in bodies]
            out = []
            try:
                for f in futures:
                    out.append(f.result())
                    if progress:
                        progress(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            return out
