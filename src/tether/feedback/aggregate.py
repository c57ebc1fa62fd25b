"""Several labelers on one item: pairwise votes, aggregation and agreement.

An *item* is one prompt with one set of responses; each labeler's ranking of it gives a
vote on every pair of its responses: the first response, the second, or a tie. From the
votes:

- ``aggregate_rankings(..., "majority")``: each pair of an item rated by several labelers
  becomes one hard pair, the majority's side (a pair whose votes split evenly is dropped);
  an item rated once keeps its ranking.
- ``aggregate_rankings(..., "soft")``: such a pair becomes a soft label, the share of
  votes preferring its chosen side (ties count half; an even split is a tie), which the
  reward model's Bradley–Terry loss and cDPO/IPO/SimPO take as their target.
- ``agreement_stats``: pairwise percent agreement, mean Cohen's κ over rater pairs,
  Krippendorff's α (nominal: first / second / tie) and each rater's agreement with the
  consensus of the others.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations

from tether.data.schemas import Ranking

__all__ = ["item_key", "pair_votes", "aggregate_rankings", "agreement_stats"]

FIRST, SECOND, TIE = "first", "second", "tie"


def item_key(r: Ranking) -> str:
    """What identifies an item: its prompt and its set of responses (in any order)."""
    return json.dumps([r.prompt, sorted(r.responses)], ensure_ascii=False)


def _votes_of(r: Ranking) -> dict[tuple[str, str], str]:
    """This ranking's vote on each pair (a, b) of its responses, a < b as strings."""
    pos: dict[str, int] = {}
    tiers = r.tiers or list(range(len(r.order)))
    for p, idx in enumerate(r.order):  # a text given twice counts at its better place
        text = r.responses[idx]
        pos[text] = min(pos.get(text, tiers[p]), tiers[p])
    out = {}
    for a, b in combinations(sorted(set(pos)), 2):
        out[(a, b)] = TIE if pos[a] == pos[b] else (FIRST if pos[a] < pos[b] else SECOND)
    return out


def pair_votes(rankings: list[Ranking]) -> dict[str, dict]:
    """``{item: {"prompt", "raters": [...], "votes": {(a, b): {rater: first|second|tie}}}}``.

    A rater who ranked the same item twice counts once (their last ranking). Soft labels
    in the input are votes too: a pair with ``soft_label`` p votes for its majority side
    (a tie at 0.5)."""
    items: dict[str, dict] = {}
    for n, r in enumerate(rankings):
        key = item_key(r)
        item = items.setdefault(key, {"prompt": r.prompt, "raters": [], "votes": defaultdict(dict)})
        rater = r.rater if r.rater is not None else f"anonymous-{n}"
        if rater not in item["raters"]:
            item["raters"].append(rater)
        votes = _votes_of(r)
        if r.soft_label != 1.0:
            flip = {FIRST: SECOND, SECOND: FIRST, TIE: TIE}
            votes = {k: (TIE if r.soft_label == 0.5 else (v if r.soft_label > 0.5 else flip[v])) for k, v in votes.items()}
        for pair, vote in votes.items():
            item["votes"][pair][rater] = vote
    return items


def aggregate_rankings(rankings: list[Ranking], method: str = "soft") -> list[Ranking]:
    """Rankings with one entry per multiply-rated pair (see the module docstring).

    ``method``: ``"none"`` (every labeler's ranking as it is: the labelers' disagreement
    is itself a soft label, in expectation), ``"majority"`` or ``"soft"``."""
    if method == "none":
        return list(rankings)
    if method not in ("majority", "soft"):
        raise ValueError(f"unknown aggregation {method!r}; use none, majority or soft")
    by_item: dict[str, list[Ranking]] = defaultdict(list)
    for r in rankings:
        by_item[item_key(r)].append(r)
    votes = pair_votes(rankings)
    out: list[Ranking] = []
    for key, group in by_item.items():
        item = votes[key]
        if len(item["raters"]) == 1:  # one labeler (unnamed rankings count as different labelers)
            out.append(group[-1])
            continue
        for (a, b), by_rater in item["votes"].items():
            n = len(by_rater)
            share_a = sum(1.0 if v == FIRST else 0.5 if v == TIE else 0.0 for v in by_rater.values()) / n
            chosen, rejected, p = (a, b, share_a) if share_a >= 0.5 else (b, a, 1.0 - share_a)
            meta = {"raters": sorted(by_rater), "votes": n}
            if method == "majority":
                if p == 0.5:
                    continue  # no majority
                out.append(Ranking(item["prompt"], [chosen, rejected], [0, 1], "majority", meta))
            elif p == 0.5:
                out.append(Ranking(item["prompt"], [chosen, rejected], [0, 1], "soft", meta, tiers=[0, 0]))
            else:
                out.append(Ranking(item["prompt"], [chosen, rejected], [0, 1], "soft", meta, soft_label=p))
    return out


def agreement_stats(rankings: list[Ranking]) -> dict:
    """Agreement among labelers on the pairs of the items several of them ranked.

    Returns ``items_multi`` (items with ≥ 2 raters), ``pairs_compared`` (rater-pair ×
    response-pair comparisons), ``percent_agreement`` (share of those comparisons with the
    same vote), ``cohen_kappa_mean`` (mean over rater pairs with ≥ 10 shared pairs),
    ``krippendorff_alpha`` (nominal, raters × response pairs), ``raters`` (each rater's
    ``agreement_with_consensus`` of the others and ``items``). Values are None when no
    item has two raters."""
    from tether.feedback.agreement import cohen_kappa, krippendorff_alpha, rater_quality

    items = pair_votes(rankings)
    multi = {k: v for k, v in items.items() if len(v["raters"]) >= 2}
    out: dict = {"items": len(items), "items_multi": len(multi), "raters_total": len({
        r for v in items.values() for r in v["raters"]}), "pairs_compared": 0, "percent_agreement": None,
        "cohen_kappa_mean": None, "krippendorff_alpha": None, "raters": {}}
    if not multi:
        return out
    ratings: dict[str, dict] = defaultdict(dict)  # rater → {(item, pair): vote}
    for key, item in multi.items():
        for pair, by_rater in item["votes"].items():
            for rater, vote in by_rater.items():
                ratings[rater][(key, pair)] = vote
    same = total = 0
    for item in multi.values():
        for by_rater in item["votes"].values():
            for x, y in combinations(list(by_rater.values()), 2):
                same += x == y
                total += 1
    out["pairs_compared"] = total
    out["percent_agreement"] = same / total if total else None
    kappas = []
    for ra, rb in combinations(sorted(ratings), 2):
        shared = sorted(set(ratings[ra]) & set(ratings[rb]))
        if len(shared) >= 10:
            k = cohen_kappa([ratings[ra][s] for s in shared], [ratings[rb][s] for s in shared])
            if k == k:  # nan when both raters are constant
                kappas.append(k)
    out["cohen_kappa_mean"] = sum(kappas) / len(kappas) if kappas else None
    out["cohen_kappa_rater_pairs"] = len(kappas)
    units = sorted({u for r in ratings.values() for u in r})
    raters = sorted(ratings)
    data = [[ratings[r].get(u) for u in units] for r in raters]
    try:
        out["krippendorff_alpha"] = krippendorff_alpha(data, level="nominal")
    except ValueError:
        out["krippendorff_alpha"] = None
    out["raters"] = {r: {k: (None if isinstance(v, float) and v != v else v) for k, v in q.items()}
                     for r, q in rater_quality(ratings).items()}  # NaN (nothing scored) → None: valid JSON
    return out
