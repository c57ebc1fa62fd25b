"""The record types Tether reads and writes, and their validation.

Demonstration (SFT); TRL's ``prompt``/``completion`` and ``messages`` forms are read too::

    {"prompt": "write three words about fruits", "response": "apple pear fig"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Ranking of K ≥ 2 responses by one labeler (indices of ``responses``, best first; a nested
list is a tie, so ``[2, [0, 3], 1]`` ranks 2 first, 0 and 3 equal, then 1)::

    {"prompt": "...", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1],
     "rater": "labeler-3"}

Pairwise comparison (TRL's prompt/chosen/rejected; a ranking with K = 2). Optional: ``tie``
(no preference), ``strength`` (how much better, ≥ 0: Llama 2's margin) and ``soft_label``
(the probability that chosen is preferred, e.g. the share of labelers who preferred it)::

    {"prompt": "...", "chosen": "...", "rejected": "...", "rater": "labeler-1",
     "strength": 2, "soft_label": 0.67}

``prompt`` may also be a list of chat messages ``[{"role": "user", "content": "..."}]``;
``chosen``/``rejected`` may be message lists ending in the assistant's turn (TRL's
conversational form; without ``prompt`` the messages before that turn are the prompt).

Every problem is a :class:`~tether.data.io.DataError` naming the file, line and field. A
chat message is ``{"role": "system"|"user"|"assistant", "content": str}`` (other keys are
dropped; any other role is an error; empty content is kept as it is). A ranking holds at
most ``MAX_RESPONSES`` (128) responses: its K(K−1)/2 pairs are what training reads.
:class:`ChatFormatError` is the error of :func:`check_messages`, for conversations that
come from code rather than a file (the tokenizer's :func:`~tether.data.tokenize.chat_prompt_ids`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from tether.data.io import DataError, read_jsonl, short_repr

__all__ = [
    "ChatFormatError",
    "check_messages",
    "Demonstration",
    "Ranking",
    "iter_records",
    "load_demonstrations",
    "load_rankings",
    "parse_demonstration",
    "parse_ranking",
    "ranking_record",
    "rankings_to_pairs",
]

Prompt = Union[str, list]
CHAT_ROLES = ("system", "user", "assistant")
MAX_RESPONSES = 128


class ChatFormatError(ValueError):
    """A conversation (or prompt, or response) that cannot be rendered into token ids: an
    unknown role, content that is not a string, an empty message list, a lone surrogate, or
    a chat template that rejects the messages. The message names the field, e.g.
    ``messages[1].role``."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def _message_problem(msg, where: str) -> tuple[str, str] | None:
    """(field, what is wrong) of one chat message, or None when it is fine."""
    if not isinstance(msg, dict):
        return where, f"each message must be an object with role and content, got {type(msg).__name__}"
    role, content = msg.get("role"), msg.get("content")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        return f"{where}.role", f"unknown chat role {short_repr(role)}; expected one of {list(CHAT_ROLES)}"
    if not isinstance(content, str):
        return f"{where}.content", f"content must be a string, got {type(content).__name__}"
    return None


def check_messages(messages, name: str = "messages") -> list[dict]:
    """``[{"role", "content"}, ...]`` checked (see the module docstring) and stripped to those
    two keys; raises :class:`ChatFormatError` naming the bad field."""
    if not isinstance(messages, list):
        raise ChatFormatError(f"must be a list of chat messages, got {type(messages).__name__}", name)
    if not messages:
        raise ChatFormatError("message list must not be empty", name)
    for i, msg in enumerate(messages):
        problem = _message_problem(msg, f"{name}[{i}]")
        if problem:
            raise ChatFormatError(problem[1], problem[0])
        try:
            msg["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ChatFormatError("holds a lone surrogate, which is not Unicode", f"{name}[{i}].content") from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass
class Demonstration:
    prompt: Prompt
    response: str


@dataclass
class Ranking:
    prompt: Prompt
    responses: list[str]
    #: indices into ``responses``, best first (tied responses are adjacent)
    order: list[int]
    rater: str | None = None
    meta: dict = field(default_factory=dict)
    #: tier of each position of ``order`` (equal tiers are ties); None = a strict ranking
    tiers: list[int] | None = None
    #: probability that the order is right, for every strict pair (1 = a hard label)
    soft_label: float = 1.0
    #: how much better (≥ 0): the Bradley–Terry margin of every strict pair (Llama 2)
    strength: float | None = None

    def ranked(self) -> list[str]:
        return [self.responses[i] for i in self.order]

    @property
    def hard(self) -> bool:
        """A strict ranking with a hard label (every pair's target is 1)."""
        return self.tiers is None and self.soft_label == 1.0

    def pair_targets(self) -> list[float]:
        """Target P(i ≻ j) for each pair of positions i < j of ``ranked()``, in
        ``torch.triu_indices`` order: ``soft_label`` for a strict pair, 0.5 for a tie."""
        k = len(self.order)
        tiers = self.tiers or list(range(k))
        return [0.5 if tiers[i] == tiers[j] else self.soft_label for i in range(k) for j in range(i + 1, k)]

    def tied(self, i: int, j: int) -> bool:
        """Whether the responses at positions i and j of ``ranked()`` are tied."""
        return self.tiers is not None and self.tiers[i] == self.tiers[j]


@dataclass
class StepExample:
    """A solution as reasoning steps, each labelled (1 right, 0 wrong, or a probability in
    between): a process reward model's training example."""

    prompt: Prompt
    steps: list[str]
    labels: list[float]
    #: what joins the steps into the response text the model reads
    separator: str = "\n"

    def separator_join(self) -> str:
        return self.separator.join(self.steps)


def parse_step_example(record: dict, path="<record>", line: int | None = None, *,
                       separator: str = "\n") -> StepExample:
    """``{"prompt", "steps": [str, ...], "labels": [0/1 or a probability, ...]}``; a record
    may give its own ``separator``."""
    prompt = _prompt(record, path, line)
    steps = record.get("steps")
    if steps is None:
        raise DataError(path, line, "missing", field="steps")
    if not isinstance(steps, list) or not steps:
        raise DataError(path, line, f"must be a non-empty list of strings, got {short_repr(steps)}", field="steps")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataError(path, line, f"must be a non-empty string, got {short_repr(step)}", field=f"steps[{i}]")
    labels = record.get("labels")
    if labels is None:
        raise DataError(path, line, "missing", field="labels")
    if not isinstance(labels, list) or len(labels) != len(steps):
        raise DataError(path, line, f"must be a list with one label per step ({len(steps)}), got {short_repr(labels)}",
                        field="labels")
    values = []
    for i, v in enumerate(labels):
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise DataError(path, line, f"must be 0, 1 or a probability in between, got {short_repr(v)}",
                            field=f"labels[{i}]")
        values.append(float(v))
    sep = record.get("separator", separator)
    if not isinstance(sep, str) or not sep:
        raise DataError(path, line, f"must be a non-empty string, got {short_repr(sep)}", field="separator")
    return StepExample(prompt=prompt, steps=list(steps), labels=values, separator=sep)


def load_step_examples(source: str | Path, *, separator: str = "\n") -> list[StepExample]:
    """Step-labelled solutions from a JSONL file or a Hugging Face dataset."""
    examples = [parse_step_example(rec, where, line, separator=separator) for where, line, rec in iter_records(source)]
    if not examples:
        raise DataError(source, None, "no step-labelled solutions in file")
    return examples


def step_example_record(ex: StepExample, **extra) -> dict:
    return {"prompt": ex.prompt, "steps": ex.steps, "labels": ex.labels, "separator": ex.separator, **extra}


def _text(record: dict, key: str, path, line, *, allow_empty: bool = False) -> str:
    if key not in record:
        raise DataError(path, line, "missing", field=key)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(path, line, f"must be a string, got {type(value).__name__}", field=key)
    if not allow_empty and not value.strip():
        raise DataError(path, line, "must be a non-empty string", field=key)
    return value


def _messages(value, path, line, fname: str) -> list:
    if not value:
        raise DataError(path, line, "message list must not be empty", field=fname)
    for i, msg in enumerate(value):
        problem = _message_problem(msg, f"{fname}[{i}]")
        if problem:
            raise DataError(path, line, problem[1], field=problem[0])
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(record: dict, path, line) -> Prompt:
    if "prompt" not in record:
        raise DataError(path, line, "missing", field="prompt")
    value = record["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, line, "must be a non-empty string", field="prompt")
        return value
    if isinstance(value, list):
        return _messages(value, path, line, "prompt")
    raise DataError(path, line, f"must be a string or a list of chat messages, got {type(value).__name__}", field="prompt")


def _assistant_turn(value, path, line, key: str, allow_empty: bool) -> tuple[str, list | None]:
    """A response given as text, or as messages ending in the assistant's turn (returns the
    turn's text and the messages before it)."""
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError(path, line, "must be a non-empty string", field=key)
        return value, None
    if isinstance(value, list):
        msgs = _messages(value, path, line, key)
        if msgs[-1]["role"] != "assistant":
            raise DataError(path, line, "the last message must be the assistant's response", field=f"{key}[{len(msgs) - 1}].role")
        if not allow_empty and not msgs[-1]["content"].strip():
            raise DataError(path, line, "the assistant's response must not be empty", field=f"{key}[{len(msgs) - 1}].content")
        return msgs[-1]["content"], msgs[:-1]
    raise DataError(path, line, f"must be a string, got {type(value).__name__} (or a list of chat messages)", field=key)


def parse_demonstration(record: dict, path="<record>", line: int | None = None) -> Demonstration:
    if "messages" in record and "prompt" not in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise DataError(path, line, f"must be a list of chat messages, got {type(msgs).__name__}", field="messages")
        text, before = _assistant_turn(msgs, path, line, "messages", allow_empty=False)
        if not before:
            raise DataError(path, line, "needs at least one message before the assistant's response", field="messages")
        return Demonstration(prompt=before, response=text)
    key = "completion" if "completion" in record and "response" not in record else "response"
    if key not in record:
        raise DataError(path, line, "missing (give 'prompt' + 'response', 'prompt' + 'completion', or 'messages')",
                        field="response")
    text, _ = _assistant_turn(record[key], path, line, key, allow_empty=False)
    return Demonstration(prompt=_prompt(record, path, line), response=text)


def _number(record: dict, key: str, path, line, lo: float, hi: float | None = None) -> float | None:
    if key not in record or record[key] is None:
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(path, line, f"must be a finite number, got {short_repr(value)}", field=key)
    if value < lo or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise DataError(path, line, f"must be {bounds if hi is None else 'in ' + bounds}, got {value}", field=key)
    return float(value)


def _order(value, k: int, path, line) -> tuple[list[int], list[int] | None]:
    """``ranking`` → (order, tiers or None). A nested list is a group of tied responses."""
    def bad() -> DataError:
        return DataError(path, line, f"must be a permutation of 0..{k - 1}, best first (a nested list "
                                     f"for a tie), got {short_repr(value)}", field="ranking")

    if not isinstance(value, list):
        raise bad()
    order, tiers = [], []
    for tier, item in enumerate(value):
        group = item if isinstance(item, list) else [item]
        if not group or any(isinstance(i, bool) or not isinstance(i, int) for i in group):
            raise bad()
        order.extend(group)
        tiers.extend([tier] * len(group))
    if sorted(order) != list(range(k)):
        raise bad()
    return order, (tiers if len(set(tiers)) < k else None)


def parse_ranking(
    record: dict, path="<record>", line: int | None = None, *, allow_empty_responses: bool = False
) -> Ranking:
    rater = record.get("rater")
    if rater is not None and not isinstance(rater, (str, int)):
        raise DataError(path, line, f"must be a string, got {type(rater).__name__}", field="rater")
    rater = None if rater is None else str(rater)
    soft = _number(record, "soft_label", path, line, 0.0, 1.0)
    strength = _number(record, "strength", path, line, 0.0)
    meta = {k: record[k] for k in ("item", "source") if k in record}
    if "chosen" in record or "rejected" in record:
        for key in ("chosen", "rejected"):
            if key not in record:
                raise DataError(path, line, "missing", field=key)
        chosen, before_c = _assistant_turn(record["chosen"], path, line, "chosen", allow_empty_responses)
        rejected, before_r = _assistant_turn(record["rejected"], path, line, "rejected", allow_empty_responses)
        if "prompt" in record:
            prompt = _prompt(record, path, line)
        else:
            if not before_c:
                raise DataError(path, line, "missing (or give chosen/rejected as chat messages with the prompt "
                                            "before the assistant's turn)", field="prompt")
            if before_c != before_r:
                raise DataError(path, line, "chosen and rejected must share the messages before the response",
                                field="rejected")
            prompt = before_c
        tie = record.get("tie", False)
        if not isinstance(tie, bool):
            raise DataError(path, line, f"must be true or false, got {short_repr(tie)}", field="tie")
        if tie and soft is not None and soft != 0.5:
            raise DataError(path, line, f"a tie has soft_label 0.5, got {soft}", field="soft_label")
        return Ranking(prompt, [chosen, rejected], [0, 1], rater, meta, tiers=[0, 0] if tie else None,
                       soft_label=1.0 if soft is None or tie else soft, strength=strength)
    prompt = _prompt(record, path, line)
    if "responses" not in record:
        raise DataError(path, line, "missing (give 'responses' + 'ranking', or 'chosen' + 'rejected')", field="responses")
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(path, line, "must be a list of at least 2 responses", field="responses")
    if len(responses) > MAX_RESPONSES:
        raise DataError(path, line, f"holds {len(responses)} responses, more than the {MAX_RESPONSES} allowed",
                        field="responses")
    texts = [_assistant_turn(r, path, line, f"responses[{i}]", allow_empty_responses)[0] for i, r in enumerate(responses)]
    if "ranking" not in record:
        raise DataError(path, line, "missing (indices of 'responses', best first)", field="ranking")
    order, tiers = _order(record["ranking"], len(texts), path, line)
    return Ranking(prompt, texts, order, rater, meta, tiers=tiers, soft_label=1.0 if soft is None else soft,
                   strength=strength)


def ranking_record(r: Ranking, **extra) -> dict:
    """The JSONL record of a ranking (ties as nested lists), readable by :func:`parse_ranking`."""
    if r.tiers is None:
        ranking: list = list(r.order)
    else:
        ranking = []
        for pos, item in enumerate(r.order):
            if pos and r.tiers[pos] == r.tiers[pos - 1]:
                last = ranking[-1]
                ranking[-1] = (last if isinstance(last, list) else [last]) + [item]
            else:
                ranking.append(item)
    out = {"prompt": r.prompt, "responses": r.responses, "ranking": ranking, "rater": r.rater}
    if r.soft_label != 1.0:
        out["soft_label"] = r.soft_label
    if r.strength is not None:
        out["strength"] = r.strength
    return {**out, **r.meta, **extra}


def iter_records(source: str | Path) -> Iterator[tuple[str, int, dict]]:
    """``(where, row, record)`` for each record of a JSONL file or a Hugging Face dataset.

    A dataset is a folder written by ``Dataset.save_to_disk``, a ``.parquet``/``.csv``/``.arrow``
    file, a folder of such (or of ``.json``/``.jsonl``) files, or ``hf:NAME[:SPLIT]`` on the
    hub (split ``train`` by default); it needs the ``datasets`` package (``pip install
    'tether[datasets]'``). Any other file is read as JSONL. Row numbers start at 1, like
    JSONL lines. A dataset's columns cover every row, so the keys a row leaves empty (None)
    are dropped: a ranking row of a mixed dataset has no ``chosen``.
    """
    s = str(source)
    path = Path(s)
    if not s.startswith("hf:") and not path.is_dir() and path.suffix not in (".parquet", ".csv", ".arrow"):
        for line, rec in read_jsonl(path):
            yield s, line, rec
        return
    dataset = _load_dataset(s)
    for i, rec in enumerate(dataset, start=1):
        yield s, i, {k: v for k, v in dict(rec).items() if v is not None}


def _load_dataset(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(source, None, "reading a Hugging Face dataset needs the 'datasets' package: "
                                      "pip install 'tether[datasets]'") from None
    path = Path(source)
    try:
        if source.startswith("hf:"):
            name, _, split = source[3:].partition(":")
            return datasets.load_dataset(name, split=split or "train")
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
            return ds
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            return ds["train"] if "train" in ds else ds[next(iter(ds))]
        if path.is_dir() or path.is_file():
            files = [path] if path.is_file() else sorted(
                p for p in path.iterdir() if p.suffix in (".parquet", ".json", ".jsonl", ".csv", ".arrow"))
            if not files:
                raise DataError(source, None, "no dataset here (no dataset_info.json, .parquet, .json, .jsonl, .csv or .arrow)")
            kind = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}[files[0].suffix]
            return datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets' own errors: keep them, with the source named
        raise DataError(source, None, f"could not load the dataset: {exc}") from None
    raise DataError(source, None, "file not found")


def load_demonstrations(source: str | Path) -> list[Demonstration]:
    """Demonstrations from a JSONL file or a Hugging Face dataset (see :func:`iter_records`)."""
    demos = [parse_demonstration(rec, where, line) for where, line, rec in iter_records(source)]
    if not demos:
        raise DataError(source, None, "no demonstrations in file")
    return demos


def load_rankings(source: str | Path, *, allow_empty_responses: bool = False) -> list[Ranking]:
    """Rankings and pairs from a JSONL file or a Hugging Face dataset. Empty responses are
    errors unless allowed (a policy's own samples may be empty, and ranking them low is
    exactly what labelers should do)."""
    rankings = [parse_ranking(rec, where, line, allow_empty_responses=allow_empty_responses)
                for where, line, rec in iter_records(source)]
    if not rankings:
        raise DataError(source, None, "no rankings or pairs in file")
    return rankings


def rankings_to_pairs(rankings: list[Ranking]) -> list[dict]:
    """All K(K−1)/2 pairs of each ranking, as TRL-style ``{prompt, chosen, rejected, rater}``
    records (with ``tie``, ``soft_label`` and ``strength`` where they apply)."""
    pairs = []
    for r in rankings:
        ranked = r.ranked()
        targets = iter(r.pair_targets())
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                t = next(targets)
                rec = {"prompt": r.prompt, "chosen": ranked[i], "rejected": ranked[j], "rater": r.rater}
                if r.tied(i, j):
                    rec["tie"] = True
                elif t != 1.0:
                    rec["soft_label"] = t
                if r.strength is not None:
                    rec["strength"] = r.strength
                pairs.append(rec)
    return pairs
