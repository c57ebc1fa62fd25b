"""The record types Tether reads and writes, and their validation.

Demonstration (SFT)::

    {"prompt": "write three words about fruits", "response": "apple pear fig"}

Ranking of K ≥ 2 responses by one labeler (best first; a pair is a ranking with K = 2)::

    {"prompt": "...", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1],
     "rater": "labeler-3"}

Pairwise comparison (TRL-compatible; becomes a ranking with K = 2)::

    {"prompt": "...", "chosen": "...", "rejected": "...", "rater": "labeler-1"}

``prompt`` may also be a list of chat messages ``[{"role": "user", "content": "..."}]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from tether.data.io import DataError, read_jsonl

__all__ = [
    "Demonstration",
    "Ranking",
    "load_demonstrations",
    "load_rankings",
    "parse_demonstration",
    "parse_ranking",
    "rankings_to_pairs",
]

Prompt = Union[str, list]
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class Demonstration:
    prompt: Prompt
    response: str


@dataclass
class Ranking:
    prompt: Prompt
    responses: list[str]
    #: indices into ``responses``, best first
    order: list[int]
    rater: str | None = None
    meta: dict = field(default_factory=dict)

    def ranked(self) -> list[str]:
        return [self.responses[i] for i in self.order]


def _text(record: dict, key: str, path, line, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError(path, line, "missing", field=key)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(path, line, f"must be a string, got {type(value).__name__}", field=key)
    if not allow_empty and not value.strip():
        raise DataError(path, line, "must be a non-empty string", field=key)
    return value


def _prompt(record: dict, path, line) -> Prompt:
    if "prompt" not in record:
        raise DataError(path, line, "missing", field="prompt")
    value = record["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, line, "must be a non-empty string", field="prompt")
        return value
    if isinstance(value, list):
        if not value:
            raise DataError(path, line, "message list must not be empty", field="prompt")
        for i, msg in enumerate(value):
            fname = f"prompt[{i}]"
            if not isinstance(msg, dict):
                raise DataError(path, line, "each message must be an object with role and content", field=fname)
            role, content = msg.get("role"), msg.get("content")
            if role not in CHAT_ROLES:
                raise DataError(path, line, f"unknown chat role {role!r}; expected one of {list(CHAT_ROLES)}", field=f"{fname}.role")
            if not isinstance(content, str):
                raise DataError(path, line, "content must be a string", field=f"{fname}.content")
        return value
    raise DataError(path, line, f"must be a string or a list of chat messages, got {type(value).__name__}", field="prompt")


def parse_demonstration(record: dict, path="<record>", line: int | None = None) -> Demonstration:
    return Demonstration(prompt=_prompt(record, path, line), response=_text(record, "response", path, line))


def parse_ranking(
    record: dict, path="<record>", line: int | None = None, *, allow_empty_responses: bool = False
) -> Ranking:
    prompt = _prompt(record, path, line)
    rater = record.get("rater")
    if rater is not None and not isinstance(rater, (str, int)):
        raise DataError(path, line, f"must be a string, got {type(rater).__name__}", field="rater")
    rater = None if rater is None else str(rater)
    if "chosen" in record or "rejected" in record:
        chosen = _text(record, "chosen", path, line, allow_empty=allow_empty_responses)
        rejected = _text(record, "rejected", path, line, allow_empty=allow_empty_responses)
        return Ranking(prompt, [chosen, rejected], [0, 1], rater)
    if "responses" not in record:
        raise DataError(path, line, "missing (give 'responses' + 'ranking', or 'chosen' + 'rejected')", field="responses")
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(path, line, "must be a list of at least 2 strings", field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(path, line, f"must be a string, got {type(r).__name__}", field=f"responses[{i}]")
        if not allow_empty_responses and not r.strip():
            raise DataError(path, line, "must be a non-empty string", field=f"responses[{i}]")
    order = record.get("ranking")
    if order is None:
        raise DataError(path, line, "missing (indices of 'responses', best first)", field="ranking")
    if (
        not isinstance(order, list)
        or sorted(order) != list(range(len(responses)))
        or any(isinstance(i, bool) or not isinstance(i, int) for i in order)
    ):
        raise DataError(
            path, line, f"must be a permutation of 0..{len(responses) - 1} (best first), got {order!r}", field="ranking"
        )
    return Ranking(prompt, list(responses), list(order), rater)


def load_demonstrations(path: str | Path) -> list[Demonstration]:
    demos = [parse_demonstration(rec, path, line) for line, rec in read_jsonl(path)]
    if not demos:
        raise DataError(path, None, "no demonstrations in file")
    return demos


def load_rankings(path: str | Path, *, allow_empty_responses: bool = False) -> list[Ranking]:
    """Rankings and pairs from JSONL. Empty responses are errors unless allowed (a policy's
    own samples may be empty, and ranking them low is exactly what labelers should do)."""
    rankings = [parse_ranking(rec, path, line, allow_empty_responses=allow_empty_responses)
                for line, rec in read_jsonl(path)]
    if not rankings:
        raise DataError(path, None, "no rankings or pairs in file")
    return rankings


def rankings_to_pairs(rankings: list[Ranking]) -> list[dict]:
    """All K(K−1)/2 ordered pairs of each ranking, as ``{prompt, chosen, rejected, rater}``."""
    pairs = []
    for r in rankings:
        ranked = r.ranked()
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                pairs.append({"prompt": r.prompt, "chosen": ranked[i], "rejected": ranked[j], "rater": r.rater})
    return pairs
