"""Inter-annotator agreement: percent agreement, Cohen's kappa and Krippendorff's alpha.

Which statistic to use
----------------------
* :func:`percent_agreement` — the share of items on which two raters gave the same label.
  Easy to read, but inflated by chance: two raters who label 90% of items "A" at random
  already agree on 0.9² + 0.1² = 82% of items. Report it next to a chance-corrected number.
* :func:`cohen_kappa` — two raters who both rated the same items, nominal labels (or
  ordered labels with ``weights="linear"`` / ``"quadratic"``). Corrects for chance with
  each rater's *own* label distribution. Identical to ``sklearn.metrics.cohen_kappa_score``.
* :func:`krippendorff_alpha` — any number of raters, missing ratings (not every rater rates
  every item), and nominal, ordinal, interval or ratio data. Corrects for chance with the
  *pooled* label distribution. Identical to ``krippendorff.alpha`` (the PyPI package).
  Krippendorff suggests α ≥ 0.800 for reliable data and α ≥ 0.667 for tentative conclusions.

For a panel of labelers stored as ``{rater: {item: label}}``,
:func:`pairwise_agreement_matrix` gives percent agreement between every pair of raters and
:func:`rater_quality` scores each rater against the leave-one-out majority of the others
(useful to spot a careless or adversarial labeler).

Missing ratings are ``None`` or a float NaN everywhere in this module. The module is pure
Python + NumPy; scikit-learn and ``krippendorff`` are only used by the tests as oracles.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "cohen_kappa",
    "krippendorff_alpha",
    "pairwise_agreement_matrix",
    "percent_agreement",
    "rater_quality",
]

Level = Literal["nominal", "ordinal", "interval", "ratio"]
_LEVELS = ("nominal", "ordinal", "interval", "ratio")


# --------------------------------------------------------------------------- helpers


def _scalar(value: Any) -> Any:
    """NumPy scalars -> the matching Python scalar (``np.int64(3)`` -> ``3``)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_missing(value: Any) -> bool:
    """``None`` or a float NaN (Python or NumPy) marks a missing rating."""
    if value is None:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _as_list(labels: Any, name: str) -> list[Any]:
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got an array of shape {labels.shape}")
        return [_scalar(v) for v in labels.tolist()]
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise TypeError(f"{name} must be a sequence of labels, got {type(labels).__name__}")
    return [_scalar(v) for v in labels]


def _paired(labels_a: Any, labels_b: Any) -> list[tuple[Any, Any]]:
    """(a, b) for the items both raters rated; checks lengths and that some item is left."""
    a = _as_list(labels_a, "labels_a")
    b = _as_list(labels_b, "labels_b")
    if len(a) != len(b):
        raise ValueError(
            f"labels_a and labels_b must rate the same items: got lengths {len(a)} and {len(b)}"
        )
    pairs = [(x, y) for x, y in zip(a, b) if not (_is_missing(x) or _is_missing(y))]
    if not pairs:
        raise ValueError(
            f"no item is rated by both raters (all {len(a)} items have a missing label on at "
            "least one side); agreement is undefined"
        )
    return pairs


# --------------------------------------------------------------------------- two raters


def percent_agreement(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float:
    """Share of items on which two raters gave the same label.

    ``p_o = (1 / N) · Σ_i [a_i == b_i]`` over the N items that both raters labeled; items where
    either label is ``None``/NaN are skipped.

    Not corrected for chance (see the module docstring); use :func:`cohen_kappa` or
    :func:`krippendorff_alpha` for that.

    Raises:
        ValueError: the two sequences have different lengths, or no item is rated by both.
    """
    pairs = _paired(labels_a, labels_b)
    return sum(1 for x, y in pairs if x == y) / len(pairs)


def cohen_kappa(
    labels_a: Sequence[Any],
    labels_b: Sequence[Any],
    *,
    weights: Literal["linear", "quadratic"] | None = None,
    labels: Sequence[Any] | None = None,
) -> float:
    """Cohen's kappa between two raters; equals ``sklearn.metrics.cohen_kappa_score``.

    Items where either label is ``None``/NaN are dropped first. With ``K`` categories
    ``labels[0..K-1]`` (default: the sorted union of the labels both raters used), let
    ``O`` be the K×K confusion matrix (``O[i, j]`` = items rater A put in category i and
    rater B in category j), ``N = Σ O`` and ``E[i, j] = (row_i(O) · col_j(O)) / N`` the
    counts expected if the raters labeled independently with their own marginals. Then::

        κ = 1 − Σ w[i, j] · O[i, j] / Σ w[i, j] · E[i, j]

    with disagreement weights ``w[i, j] = [i ≠ j]`` (unweighted; this is the familiar
    ``(p_o − p_e) / (1 − p_e)``), ``|i − j|`` (``"linear"``) or ``(i − j)²``
    (``"quadratic"``). Weights use the *positions* of the categories in ``labels`` (the
    sorted order by default), not the label values, as scikit-learn does.

    ``labels`` restricts the computation to those categories, in that order: items whose
    label (from either rater) is not in ``labels`` are ignored. At least one of ``labels``
    must occur in ``labels_a`` (scikit-learn's rule), otherwise ValueError.

    Degenerate case: if ``Σ w · E = 0`` — in practice both raters used one and the same
    single label (e.g. both always said "A"), or no item is left after the ``labels``
    filter — kappa is 0/0. Like scikit-learn (which also warns) this returns
    ``float("nan")``, silently. Two constant raters with *different* labels give 0.0.

    Unlike scikit-learn, non-integer float labels are accepted (treated as categories).
    Labels of one call must be mutually orderable when ``labels`` is not given.

    Raises:
        ValueError: different lengths, no item rated by both, unknown ``weights``, empty
            ``labels``, no label of ``labels`` in ``labels_a``, or unorderable labels.
    """
    if weights not in (None, "linear", "quadratic"):
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    pairs = _paired(labels_a, labels_b)

    if labels is None:
        try:
            categories = sorted({x for pair in pairs for x in pair})
        except TypeError as exc:
            raise ValueError(
                "labels of mixed, unorderable types (e.g. strings and numbers); pass `labels=` "
                "to fix the category order"
            ) from exc
    else:
        categories = _as_list(labels, "labels")
        if not categories:
            raise ValueError("labels must contain at least one label")
        if not any(x in categories for x, _ in pairs):
            raise ValueError("at least one label in `labels` must be present in labels_a")

    index: dict[Any, int] = {}
    for i, c in enumerate(categories):
        index.setdefault(c, i)
    k = len(categories)
    confusion = np.zeros((k, k), dtype=np.float64)
    for x, y in pairs:
        i, j = index.get(x), index.get(y)
        if i is not None and j is not None:
            confusion[i, j] += 1.0

    n = confusion.sum()
    if n == 0:
        return float("nan")
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / n
    positions = np.arange(k, dtype=np.float64)
    if weights is None:
        w = 1.0 - np.eye(k)
    elif weights == "linear":
        w = np.abs(positions[:, None] - positions[None, :])
    else:
        w = (positions[:, None] - positions[None, :]) ** 2
    denominator = float((w * expected).sum())
    if denominator == 0.0:
        return float("nan")
    return float(1.0 - (w * confusion).sum() / denominator)


# --------------------------------------------------------------------------- Krippendorff


def _rows(data: Any) -> list[list[Any]]:
    """raters × items data -> list of rows of Python scalars; checks it is rectangular."""
    if isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise ValueError(f"data must be 2-D (raters × items), got an array of shape {data.shape}")
        rows = [[_scalar(v) for v in row] for row in data.tolist()]
        if data.dtype.kind in "US":
            # NumPy turns NaN into the string "nan" in a string array; it marks a missing rating
            missing = "nan" if data.dtype.kind == "U" else b"nan"
            rows = [[None if v == missing else v for v in row] for row in rows]
        return rows
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data must be a list of lists or a 2-D array, got {type(data).__name__}")
    rows = []
    for r, row in enumerate(data):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise ValueError(  # noqa: TRY004 - a shape error, like ndim != 2 for arrays
                f"data must be 2-D (raters × items); row {r} is {type(row).__name__}, not a sequence"
            )
        rows.append([_scalar(v) for v in row])
    lengths = {len(row) for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"every rater's row must have one entry per item; got row lengths {sorted(lengths)}")
    return rows


def _value_counts(rows: list[list[Any]], level: str) -> tuple[list[Any], np.ndarray]:
    """Values occurring in pairable units, and the (pairable units × values) count matrix.

    A unit is *pairable* when at least two raters rated it; values that occur only in
    unpairable units do not enter alpha at all. Values are sorted for non-nominal levels.
    """
    n_items = len(rows[0]) if rows else 0
    units: list[list[Any]] = []
    for u in range(n_items):
        values = [row[u] for row in rows if not _is_missing(row[u])]
        if level != "nominal":
            for v in values:
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise ValueError(  # noqa: TRY004 - invalid for the level, as in `krippendorff`
                        f"level={level!r} needs numeric ratings, got {v!r} ({type(v).__name__}); "
                        "non-numeric labels are only allowed with level='nominal'"
                    )
                if not math.isfinite(v):
                    raise ValueError(f"ratings must be finite, got {v!r}")
        if len(values) >= 2:
            units.append(values)
    n_pairable = sum(len(values) for values in units)
    if n_pairable < 2:
        raise ValueError(
            "Krippendorff's alpha needs at least 2 pairable values, i.e. at least one item rated by "
            f"two or more raters; got {len(rows)} raters × {n_items} items with no such item"
        )
    try:
        domain = list(dict.fromkeys(v for values in units for v in values))
    except TypeError as exc:
        raise TypeError("ratings must be hashable (numbers or strings)") from exc
    if level != "nominal":
        domain.sort()
    index = {v: i for i, v in enumerate(domain)}
    counts = np.zeros((len(units), len(domain)), dtype=np.float64)
    for u, values in enumerate(units):
        for v in values:
            counts[u, index[v]] += 1.0
    return domain, counts


def _coincidence_matrix(counts: np.ndarray) -> np.ndarray:
    """``o[c, k] = Σ_u (number of c–k pairs of ratings in unit u) / (m_u − 1)``.

    ``counts[u, c]`` is how many raters gave value c to (pairable) unit u and
    ``m_u = Σ_c counts[u, c] ≥ 2``. Pairs are ordered and exclude a rating paired with
    itself, so ``o = Σ_u (n_u n_uᵀ − diag(n_u)) / (m_u − 1)``; its row sums are the value
    frequencies ``n_c`` and its total is the number of pairable values ``n``.
    """
    m = counts.sum(axis=1)
    scaled = counts / (m - 1.0)[:, None]
    return scaled.T @ counts - np.diag(scaled.sum(axis=0))


def _distances(domain: list[Any], n_c: np.ndarray, level: str) -> np.ndarray:
    """Squared difference functions δ²(c, k) of Krippendorff (2011) over the value domain."""
    v = len(domain)
    if level == "nominal":
        return 1.0 - np.eye(v)
    values = np.asarray(domain, dtype=np.float64)
    c, k = values[:, None], values[None, :]
    if level == "interval":
        return (c - k) ** 2
    if level == "ratio":
        total = c + k
        ratio = np.divide(c - k, total, out=np.zeros((v, v)), where=total != 0)
        return ratio**2
    # ordinal: (Σ_{g=c..k} n_g − (n_c + n_k) / 2)², values ranked c ≤ g ≤ k
    cum = np.concatenate(([0.0], np.cumsum(n_c)))
    lo = np.minimum(np.arange(v)[:, None], np.arange(v)[None, :])
    hi = np.maximum(np.arange(v)[:, None], np.arange(v)[None, :])
    between = cum[hi + 1] - cum[lo]
    return (between - (n_c[:, None] + n_c[None, :]) / 2.0) ** 2


def krippendorff_alpha(data: Any, level: Level = "nominal") -> float:
    """Krippendorff's alpha for any number of raters, with missing ratings.

    ``data`` is raters × items (list of lists or 2-D array); ``None`` or NaN where a rater
    gave no rating. Values may be numbers, or (``level="nominal"`` only) any hashable labels
    such as strings. In a NumPy *string* array the entry ``"nan"`` is also missing (that is
    what ``np.asarray`` makes of a NaN among strings). Equals ``krippendorff.alpha(reliability_data=data,
    level_of_measurement=level)`` of the ``krippendorff`` package.

    Coincidence-matrix formulation (Krippendorff 2011, "Computing Krippendorff's
    Alpha-Reliability"). Only *pairable* items — rated by ``m_u ≥ 2`` raters — count:

    * coincidences ``o_ck = Σ_u (# ordered pairs (c, k) of distinct ratings in u) / (m_u − 1)``,
    * value frequencies ``n_c = Σ_k o_ck`` and ``n = Σ_c n_c`` (number of pairable values),
    * ``α = 1 − D_o / D_e = 1 − (n − 1) · Σ_ck o_ck δ²_ck / Σ_ck n_c n_k δ²_ck``,

    with the difference function ``δ²`` of the level of measurement:

    * nominal: ``δ²_ck = [c ≠ k]``
    * ordinal: ``δ²_ck = (Σ_{g=c}^{k} n_g − (n_c + n_k) / 2)²`` over the *ranks* of the
      values (only their order matters; frequencies are the coincidence marginals)
    * interval: ``δ²_ck = (c − k)²``
    * ratio: ``δ²_ck = ((c − k) / (c + k))²``, taken as 0 when ``c + k = 0`` (as the
      reference package does; ratio data should be non-negative)

    α = 1 is perfect agreement, α = 0 agreement at chance level, α < 0 systematic
    disagreement.

    Edge cases:

    * fewer than 2 pairable values (no item rated by two raters, e.g. a single rater, all
      ratings missing, or no items) -> ValueError.
    * no variation among the pairable values (all the same value, so D_e = 0 and alpha is
      0/0) -> ValueError. The reference package raises ValueError ("There has to be more
      than one value in the domain") when the data hold a single value, and returns NaN
      with a RuntimeWarning when other values occur only in unpairable items; this
      function raises ValueError in both cases.

    Raises:
        ValueError: unknown level, non-rectangular or non-2-D data, non-numeric or
            non-finite ratings for ordinal/interval/ratio, or the edge cases above.
    """
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    rows = _rows(data)
    domain, counts = _value_counts(rows, level)
    if len(domain) < 2:
        raise ValueError(
            f"Krippendorff's alpha is undefined without variation: all {int(counts.sum())} pairable "
            f"ratings are {domain[0]!r}, so the expected disagreement is 0"
        )
    o = _coincidence_matrix(counts)
    n_c = counts.sum(axis=0)
    n = n_c.sum()
    delta = _distances(domain, n_c, level)
    expected = float((np.outer(n_c, n_c) * delta).sum())
    if expected == 0.0:
        raise ValueError(
            f"Krippendorff's alpha is undefined: the expected disagreement is 0 at level={level!r} "
            "(all pairable values are at distance 0 from each other)"
        )
    observed = float((o * delta).sum())
    return float(1.0 - (n - 1.0) * observed / expected)


# --------------------------------------------------------------------------- panels


def pairwise_agreement_matrix(
    ratings: Mapping[Hashable, Mapping[Hashable, Any]],
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Percent agreement between every pair of raters on the items both rated.

    ``ratings`` maps rater -> {item -> label}; ``None``/NaN labels count as not rated.
    Returns ``(raters, matrix, counts)``:

    * ``raters``: the raters in the mapping's order (rows/columns of the matrices),
    * ``matrix[i, j]``: ``percent_agreement`` of raters i and j over their common items,
      NaN when they share no item; the diagonal is 1.0 (NaN for a rater with no ratings),
    * ``counts[i, j]``: number of items both rated (``counts[i, i]``: items rater i rated).

    Both matrices are symmetric.
    """
    raters = list(ratings)
    rated = [
        {item: _scalar(label) for item, label in ratings[r].items() if not _is_missing(_scalar(label))}
        for r in raters
    ]
    size = len(raters)
    matrix = np.full((size, size), np.nan)
    counts = np.zeros((size, size), dtype=np.int64)
    for i in range(size):
        counts[i, i] = len(rated[i])
        if rated[i]:
            matrix[i, i] = 1.0
        for j in range(i + 1, size):
            common = [item for item in rated[i] if item in rated[j]]
            counts[i, j] = counts[j, i] = len(common)
            if common:
                agree = sum(1 for item in common if rated[i][item] == rated[j][item])
                matrix[i, j] = matrix[j, i] = agree / len(common)
    return raters, matrix, counts


def rater_quality(ratings: Mapping[Hashable, Mapping[Hashable, Any]]) -> dict[Hashable, dict[str, Any]]:
    """Each rater's agreement with the leave-one-out consensus of the other raters.

    For rater r and each item r rated, the consensus is the majority label among the OTHER
    raters who rated that item (``None``/NaN labels count as not rated). Items with no other
    rater, or where the others' top labels tie (e.g. one says "A", one says "B"), are skipped.
    Returns ``{rater: {"agreement_with_consensus": agree / items, "items": items}}`` where
    ``items`` is the number of items scored; ``agreement_with_consensus`` is NaN when
    ``items == 0``. Every rater of ``ratings`` appears in the result, in the same order.
    """
    raters = list(ratings)
    rated = {
        r: {item: _scalar(label) for item, label in ratings[r].items() if not _is_missing(_scalar(label))}
        for r in raters
    }
    by_item: dict[Hashable, list[tuple[Hashable, Any]]] = {}
    for r in raters:
        for item, label in rated[r].items():
            by_item.setdefault(item, []).append((r, label))
    result: dict[Hashable, dict[str, Any]] = {}
    for r in raters:
        agree = scored = 0
        for item, label in rated[r].items():
            others = Counter(other_label for other, other_label in by_item[item] if other != r)
            if not others:
                continue
            top = others.most_common(2)
            if len(top) == 2 and top[0][1] == top[1][1]:
                continue
            scored += 1
            agree += label == top[0][0]
        result[r] = {
            "agreement_with_consensus": agree / scored if scored else float("nan"),
            "items": scored,
        }
    return result
