"""``tether data stats``: what a demonstrations or preferences file holds.

Counts, lengths (characters and whitespace words), duplicates, and for preferences the
labelers: how many, how many items several of them ranked, and how far they agree.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter

from tether.data.schemas import Ranking, iter_records, parse_demonstration, parse_ranking

__all__ = ["detect_kind", "file_stats"]


def detect_kind(source) -> str:
    """'demos', 'rankings' or 'steps' (step-labelled solutions), from the first record's fields."""
    for _, _, rec in iter_records(source):
        if "steps" in rec:
            return "steps"
        return "rankings" if any(k in rec for k in ("chosen", "rejected", "responses", "ranking")) else "demos"
    return "demos"


def _lengths(texts: list[str]) -> dict:
    if not texts:
        return {}
    chars = [len(t) for t in texts]
    words = [len(t.split()) for t in texts]
    return {"chars_mean": statistics.fmean(chars), "chars_median": statistics.median(chars), "chars_max": max(chars),
            "words_mean": statistics.fmean(words), "words_median": statistics.median(words), "words_max": max(words),
            "empty": sum(not t.strip() for t in texts)}


def _prompt_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def file_stats(source, kind: str = "auto") -> dict:
    """Statistics of a JSONL file or dataset (every record validated first)."""
    kind = detect_kind(source) if kind == "auto" else kind
    records = [(where, line, rec) for where, line, rec in iter_records(source)]
    raw = Counter(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=repr)  # a dataset's
                  for _, _, rec in records)                                        # dates, bytes
    out: dict = {"file": str(source), "kind": kind, "records": len(records),
                 "duplicate_records": sum(n - 1 for n in raw.values() if n > 1)}
    if kind == "demos":
        demos = [parse_demonstration(rec, where, line) for where, line, rec in records]
        prompts = Counter(_prompt_text(d.prompt) for d in demos)
        out.update(prompts=len(prompts), repeated_prompts=sum(1 for n in prompts.values() if n > 1),
                   chat_prompts=sum(not isinstance(d.prompt, str) for d in demos),
                   prompt_length=_lengths([_prompt_text(d.prompt) for d in demos]),
                   response_length=_lengths([d.response for d in demos]))
        return out
    from tether.feedback.aggregate import agreement_stats

    rankings: list[Ranking] = [parse_ranking(rec, where, line, allow_empty_responses=True)
                               for where, line, rec in records]
    ks = Counter(len(r.responses) for r in rankings)
    pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in rankings)
    prompts = Counter(_prompt_text(r.prompt) for r in rankings)
    raters = Counter(r.rater for r in rankings if r.rater is not None)
    identical = sum(len(set(r.responses)) < len(r.responses) for r in rankings)
    out.update(
        prompts=len(prompts), k=dict(sorted(ks.items())), pairs=pairs,
        with_ties=sum(r.tiers is not None for r in rankings),
        soft_labels=sum(r.soft_label != 1.0 for r in rankings),
        with_strength=sum(r.strength is not None for r in rankings),
        identical_responses=identical,
        chat_prompts=sum(not isinstance(r.prompt, str) for r in rankings),
        raters=len(raters), rankings_per_rater=dict(raters.most_common()), unrated=sum(r.rater is None for r in rankings),
        prompt_length=_lengths([_prompt_text(r.prompt) for r in rankings]),
        response_length=_lengths([x for r in rankings for x in r.responses]),
        chosen_length=_lengths([r.ranked()[0] for r in rankings]),
        rejected_length=_lengths([r.ranked()[-1] for r in rankings]),
        agreement=agreement_stats(rankings),
    )
    return out
