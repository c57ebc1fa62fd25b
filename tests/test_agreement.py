"""Agreement statistics: hand-computed values, Krippendorff's (2011) worked example, and
randomized / property-based comparisons against scikit-learn and the `krippendorff` package."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tether.feedback.agreement import (
    _coincidence_matrix,
    _rows,
    _value_counts,
    cohen_kappa,
    krippendorff_alpha,
    pairwise_agreement_matrix,
    percent_agreement,
    rater_quality,
)

try:
    from sklearn.metrics import cohen_kappa_score
except ImportError:  # pragma: no cover - test extra not installed
    cohen_kappa_score = None
try:
    import krippendorff
except ImportError:  # pragma: no cover - test extra not installed
    krippendorff = None

needs_sklearn = pytest.mark.skipif(cohen_kappa_score is None, reason="needs scikit-learn (test extra)")
needs_krippendorff = pytest.mark.skipif(krippendorff is None, reason="needs krippendorff (test extra)")

TOL = 1e-9
LEVELS = ("nominal", "ordinal", "interval", "ratio")
NAN = float("nan")

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C:
# 4 observers × 12 units, values 1..5, missing ratings as NaN.
PAPER = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
    [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN],
]
# published alphas (rounded to 3 decimals in the paper)
PAPER_ALPHA = {"nominal": 0.743, "ordinal": 0.815, "interval": 0.849, "ratio": 0.797}


def _sk_kappa(a, b, **kw):
    """sklearn's kappa on the pairs where neither label is missing."""
    keep = [(x, y) for x, y in zip(a, b) if not (_missing(x) or _missing(y))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cohen_kappa_score([x for x, _ in keep], [y for _, y in keep], **kw)


def _missing(v):
    return v is None or (isinstance(v, float) and math.isnan(v))


def _ref_alpha(data, level):
    """The `krippendorff` package's alpha, or None where it raises or returns NaN (0/0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))
        except ValueError:
            return None
    return None if math.isnan(value) else value


def _random_ratings(rng, shape, *, p_missing, n_values=5, floats=False):
    if floats:
        values = rng.uniform(0.1, 10.0, size=shape)
    else:
        values = rng.integers(1, n_values + 1, size=shape).astype(float)
    values[rng.random(shape) < p_missing] = np.nan
    return values


# --------------------------------------------------------------------------- percent agreement


def test_percent_agreement_hand():
    assert percent_agreement(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == 0.75
    assert percent_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert percent_agreement([1, 2], [2, 1]) == 0.0


def test_percent_agreement_skips_missing():
    # rated by both: items 0 (1 vs 1) and 3 (3 vs 4) -> 1/2
    a = [1, None, 2, 3.0, NAN]
    b = [1, 2, None, 4, 5]
    assert percent_agreement(a, b) == 0.5
    assert percent_agreement(np.array([1.0, np.nan, 2.0]), np.array([1.0, 1.0, 3.0])) == 0.5
    assert percent_agreement([np.float32("nan"), np.int64(2)], [1, 2]) == 1.0


def test_percent_agreement_errors():
    with pytest.raises(ValueError, match="lengths 3 and 4"):
        percent_agreement([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="no item is rated by both"):
        percent_agreement([1, None, NAN], [None, 2, 3])
    with pytest.raises(ValueError, match="no item is rated by both"):
        percent_agreement([], [])


# --------------------------------------------------------------------------- Cohen's kappa


def test_kappa_hand_2x2():
    # A\B   yes  no
    # yes    20   5     p_o = 35/50 = 0.7
    # no     10  15     p_e = 0.5·0.6 + 0.5·0.4 = 0.5  ->  κ = (0.7 − 0.5)/(1 − 0.5) = 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(b, a) == pytest.approx(0.4, abs=1e-12)


def test_kappa_hand_weighted():
    # confusion (A rows, B cols) over 0,1,2: O[0,0] = O[1,2] = O[2,2] = 1; A marg (1,1,1), B marg (1,0,2)
    # linear:    Σ w·O = 1, Σ w·E = (4 + 3 + 2)/3 = 3   -> κ = 1 − 1/3
    # quadratic: Σ w·O = 1, Σ w·E = (8 + 3 + 4)/3 = 5   -> κ = 1 − 1/5
    a, b = [0, 1, 2], [0, 2, 2]
    assert cohen_kappa(a, b, weights="linear") == pytest.approx(2 / 3, abs=1e-12)
    assert cohen_kappa(a, b, weights="quadratic") == pytest.approx(0.8, abs=1e-12)
    # unweighted: p_o = 2/3, p_e = (1·1 + 1·0 + 1·2)/9 = 1/3 -> κ = (1/3)/(2/3) = 1/2
    assert cohen_kappa(a, b) == pytest.approx(0.5, abs=1e-12)


def test_kappa_extremes_and_degenerate():
    assert cohen_kappa([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0, abs=1e-12)
    # both raters constant with the same label: 0/0 -> NaN (as sklearn)
    assert math.isnan(cohen_kappa(["A", "A", "A"], ["A", "A", "A"]))
    assert math.isnan(cohen_kappa([1], [1], weights="quadratic"))
    # constant but different: κ = 0
    assert cohen_kappa(["A", "A"], ["B", "B"]) == 0.0
    # a single item rated differently
    assert cohen_kappa([1], [2]) == 0.0


@needs_sklearn
def test_kappa_degenerate_matches_sklearn():
    for a, b in [(["A"] * 3, ["A"] * 3), ([1], [1]), (["A", "A"], ["B", "B"]), ([1], [2])]:
        ours, ref = cohen_kappa(a, b), _sk_kappa(a, b)
        assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref, abs=TOL)


@needs_sklearn
def test_kappa_sklearn_docstring_example():
    y1 = ["negative", "positive", "negative", "neutral", "positive"]
    y2 = ["negative", "positive", "negative", "neutral", "negative"]
    assert cohen_kappa(y1, y2) == pytest.approx(0.6875, abs=1e-12)
    assert cohen_kappa(y1, y2) == pytest.approx(_sk_kappa(y1, y2), abs=TOL)


def test_kappa_missing_pairs_dropped():
    a = [1, 2, None, 1, NAN, 2]
    b = [1, 2, 2, NAN, 1, 1]
    # kept pairs: (1,1), (2,2), (2,1): p_o = 2/3; A marg {1:1, 2:2}, B marg {1:2, 2:1}; p_e = 4/9
    assert cohen_kappa(a, b) == pytest.approx((2 / 3 - 4 / 9) / (1 - 4 / 9), abs=1e-12)
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa([1, 2, 2], [1, 2, 1]), abs=1e-15)


@needs_sklearn
def test_kappa_labels_argument_matches_sklearn():
    a = [0, 1, 2, 3, 2, 1, 0, 3, 3]
    b = [0, 2, 2, 3, 1, 1, 3, 3, 0]
    for labels in ([0, 1, 2, 3], [3, 1, 0, 2], [0, 2], [2, 7, 1]):
        for weights in (None, "linear", "quadratic"):
            ours = cohen_kappa(a, b, labels=labels, weights=weights)
            ref = _sk_kappa(a, b, labels=labels, weights=weights)
            assert ours == pytest.approx(ref, abs=TOL), (labels, weights)
    # a label set that none of the items falls in on both sides -> NaN like sklearn
    assert math.isnan(cohen_kappa([0, 1], [2, 2], labels=[0, 1]))
    assert math.isnan(_sk_kappa([0, 1], [2, 2], labels=[0, 1]))


def test_kappa_errors():
    with pytest.raises(ValueError, match="lengths 2 and 3"):
        cohen_kappa([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no item is rated by both"):
        cohen_kappa([None, 1], [2, None])
    with pytest.raises(ValueError, match="weights"):
        cohen_kappa([1, 2], [1, 2], weights="cubic")
    with pytest.raises(ValueError, match="labels_a"):
        cohen_kappa([1, 2], [1, 2], labels=[5])
    with pytest.raises(ValueError, match="at least one label"):
        cohen_kappa([1, 2], [1, 2], labels=[])
    with pytest.raises(ValueError, match="unorderable"):
        cohen_kappa([1, "a"], [1, "a"])


@needs_sklearn
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,k", [(5, 2), (30, 3), (200, 5), (1000, 7)])
@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_kappa_random_vs_sklearn(seed, n, k, weights):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, size=n).astype(float)
    # correlated second rater: copy with prob 0.6, else random
    b = np.where(rng.random(n) < 0.6, a, rng.integers(0, k, size=n)).astype(float)
    a[rng.random(n) < 0.15] = np.nan
    b[rng.random(n) < 0.15] = np.nan
    if (np.isnan(a) | np.isnan(b)).all():
        pytest.skip("no common item")
    ours = cohen_kappa(a, b, weights=weights)
    ref = _sk_kappa(a.tolist(), b.tolist(), weights=weights)
    if math.isnan(ref):
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(ref, abs=TOL)
    # unweighted kappa on strings equals kappa on the integers (sorted order is the same)
    if weights is None:
        sa = [None if math.isnan(x) else f"L{int(x)}" for x in a]
        sb = [None if math.isnan(x) else f"L{int(x)}" for x in b]
        assert cohen_kappa(sa, sb) == pytest.approx(ours, abs=TOL, nan_ok=True)


labels_with_missing = st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=40)


@needs_sklearn
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), weights=st.sampled_from([None, "linear", "quadratic"]))
def test_kappa_property_matches_sklearn_and_is_symmetric(data, weights):
    a = data.draw(labels_with_missing)
    b = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=len(a), max_size=len(a)))
    assume(any(x is not None and y is not None for x, y in zip(a, b)))
    ours = cohen_kappa(a, b, weights=weights)
    ref = _sk_kappa(a, b, weights=weights)
    swapped = cohen_kappa(b, a, weights=weights)
    if math.isnan(ref):
        assert math.isnan(ours) and math.isnan(swapped)
    else:
        assert ours == pytest.approx(ref, abs=TOL)
        assert swapped == pytest.approx(ours, abs=TOL)
        assert -1.0 - TOL <= ours <= 1.0 + TOL


# --------------------------------------------------------------------------- Krippendorff's alpha


def test_alpha_paper_example_published_values():
    for level, published in PAPER_ALPHA.items():
        assert round(krippendorff_alpha(PAPER, level), 3) == published, level


def test_alpha_paper_example_exact_nominal():
    # n = 40 pairable values, n_c = (9, 13, 10, 5, 3), Σ_c o_cc = 34:
    # α = 1 − (n − 1)·(n − Σ o_cc) / (n² − Σ n_c²) = 1 − 39·6/(1600 − 384) = 1 − 234/1216 = 113/152
    assert krippendorff_alpha(PAPER, "nominal") == pytest.approx(113 / 152, abs=1e-12)


def test_alpha_paper_coincidence_matrix():
    domain, counts = _value_counts(_rows(PAPER), "interval")
    assert domain == [1, 2, 3, 4, 5]
    o = _coincidence_matrix(counts)
    third = Fraction(1, 3)
    expected = [
        [7, 4 * third, third, third, 0],
        [4 * third, 10, 4 * third, third, 0],
        [third, 4 * third, 8, third, 0],
        [third, third, third, 4, 0],
        [0, 0, 0, 0, 3],
    ]
    np.testing.assert_allclose(o, np.array(expected, dtype=float), rtol=0, atol=1e-12)
    np.testing.assert_allclose(o.sum(axis=0), [9, 13, 10, 5, 3], rtol=0, atol=1e-12)


def test_alpha_paper_example_strings_nominal():
    names = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    data = [[None if _missing(v) else names[v] for v in row] for row in PAPER]
    assert krippendorff_alpha(data, "nominal") == pytest.approx(113 / 152, abs=1e-12)
    # the same data as a NumPy string array, where NaN becomes the string "nan"
    as_array = np.asarray([[NAN if v is None else v for v in row] for row in data])
    assert as_array.dtype.kind == "U"
    assert krippendorff_alpha(as_array, "nominal") == pytest.approx(113 / 152, abs=1e-12)


@needs_krippendorff
@pytest.mark.parametrize("level", LEVELS)
def test_alpha_paper_example_matches_reference(level):
    assert krippendorff_alpha(PAPER, level) == pytest.approx(_ref_alpha(PAPER, level), abs=TOL)
    assert krippendorff_alpha(np.array(PAPER), level) == pytest.approx(_ref_alpha(PAPER, level), abs=TOL)


def test_alpha_hand_nominal():
    # units (a,a), (a,b), (b,b), (b,b): o_aa = 2, o_ab = o_ba = 1, o_bb = 4; n_a = 3, n_b = 5, n = 8
    # α = 1 − (n − 1)·Σ o δ / Σ n_c n_k δ = 1 − 7·2 / (2·3·5) = 8/15
    data = [["a", "a", "b", "b"], ["a", "b", "b", "b"]]
    assert krippendorff_alpha(data) == pytest.approx(8 / 15, abs=1e-12)


def test_alpha_hand_interval_and_ratio():
    # units (1,1), (2,2), (3,4): Σ o δ² = 2·1 = 2; n = (n_1, n_2, n_3, n_4) = (2, 2, 1, 1), n = 6
    # Σ_{c,k} n_c n_k (c − k)² = 2·(4·1 + 2·4 + 2·9 + 2·1 + 2·4 + 1·1) = 82 -> α = 1 − 5·2/82 = 36/41
    data = [[1, 2, 3], [1, 2, 4]]
    assert krippendorff_alpha(data, "interval") == pytest.approx(36 / 41, abs=1e-12)
    # ratio: δ²(3,4) = (1/7)²; Σ n_c n_k δ² = 2·(4/9 + 2/4 + 2·9/25 + 2/25 + 2·4/36 + 1/49)
    num = 5 * 2 * Fraction(1, 49)
    den = 2 * (4 * Fraction(1, 9) + 2 * Fraction(1, 4) + 2 * Fraction(9, 25) + 2 * Fraction(1, 25)
               + 2 * Fraction(4, 36) + Fraction(1, 49))
    assert krippendorff_alpha(data, "ratio") == pytest.approx(float(1 - num / den), abs=1e-12)


def test_alpha_hand_ordinal():
    # units (1,1), (1,2), (3,3): n_1 = 3, n_2 = 1, n_3 = 2, n = 6
    # δ²(1,2) = (3 + 1 − 2)² = 4, δ²(1,3) = (3 + 1 + 2 − 2.5)² = 12.25, δ²(2,3) = (1 + 2 − 1.5)² = 2.25
    # Σ o δ² = 2·4 = 8; Σ n_c n_k δ² = 2·(3·1·4 + 3·2·12.25 + 1·2·2.25) = 180 -> α = 1 − 5·8/180
    data = [[1, 1, 3], [1, 2, 3]]
    assert krippendorff_alpha(data, "ordinal") == pytest.approx(1 - 40 / 180, abs=1e-12)
    # only the order of the values matters
    assert krippendorff_alpha([[10, 10, 300], [10, 20, 300]], "ordinal") == pytest.approx(1 - 40 / 180, abs=1e-12)


def test_alpha_perfect_agreement_is_one():
    data = [[1, 2, 3, None], [1, 2, 3, 4], [None, 2, 3, 4]]
    for level in LEVELS:
        assert krippendorff_alpha(data, level) == pytest.approx(1.0, abs=1e-12)


@needs_krippendorff
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(2, 5), (2, 50), (3, 10), (4, 30), (6, 80), (10, 15)])
def test_alpha_random_vs_reference(level, shape):
    compared = 0
    for seed in range(8):
        rng = np.random.default_rng(1000 * seed + shape[0] * 7 + shape[1])
        floats = level in ("interval", "ratio") and seed % 2 == 1
        data = _random_ratings(rng, shape, p_missing=0.3, n_values=int(rng.integers(2, 8)), floats=floats)
        if seed % 4 == 0:  # a correlated panel: raters copy a "true" label most of the time
            truth = rng.integers(1, 6, size=shape[1])
            agree = rng.random(shape) < 0.7
            data = np.where(agree & ~np.isnan(data), truth[None, :], data)
        ref = _ref_alpha(data, level)
        if ref is None:
            with pytest.raises(ValueError):
                krippendorff_alpha(data, level)
            continue
        compared += 1
        assert krippendorff_alpha(data, level) == pytest.approx(ref, abs=TOL)
        assert krippendorff_alpha(data.tolist(), level) == pytest.approx(ref, abs=TOL)
        assert krippendorff_alpha([[None if math.isnan(v) else v for v in row] for row in data.tolist()],
                                  level) == pytest.approx(ref, abs=TOL)
    assert compared >= 6


@needs_krippendorff
@pytest.mark.parametrize("seed", range(5))
def test_alpha_random_strings_vs_reference(seed):
    rng = np.random.default_rng(seed)
    words = np.array(["good", "bad", "meh", "great", "awful"])
    data = words[rng.integers(0, 5, size=(4, 40))].astype(object)
    data[rng.random((4, 40)) < 0.25] = NAN
    as_list = data.tolist()
    ref = _ref_alpha(as_list, "nominal")  # reference turns the list into a string array ("nan" missing)
    assert ref is not None
    assert krippendorff_alpha(as_list, "nominal") == pytest.approx(ref, abs=TOL)
    with_none = [[None if _missing(v) else v for v in row] for row in as_list]
    assert krippendorff_alpha(with_none, "nominal") == pytest.approx(ref, abs=TOL)


rating_matrices = st.integers(2, 5).flatmap(
    lambda raters: st.integers(1, 12).flatmap(
        lambda items: st.lists(
            st.lists(st.one_of(st.none(), st.integers(1, 4)), min_size=items, max_size=items),
            min_size=raters,
            max_size=raters,
        )
    )
)


def _nan_matrix(rows):
    return np.array([[NAN if v is None else float(v) for v in row] for row in rows])


@needs_krippendorff
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rating_matrices, level=st.sampled_from(LEVELS))
def test_alpha_property_matches_reference(rows, level):
    ref = _ref_alpha(_nan_matrix(rows), level)
    if ref is None:
        with pytest.raises(ValueError):
            krippendorff_alpha(rows, level)
    else:
        assert krippendorff_alpha(rows, level) == pytest.approx(ref, abs=TOL)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rating_matrices, level=st.sampled_from(LEVELS), perm_seed=st.integers(0, 2**32 - 1))
def test_alpha_property_invariances(rows, level, perm_seed):
    try:
        alpha = krippendorff_alpha(rows, level)
    except ValueError:
        return
    rng = np.random.default_rng(perm_seed)
    arr = np.array(rows, dtype=object)
    permuted = arr[rng.permutation(arr.shape[0])][:, rng.permutation(arr.shape[1])]
    assert krippendorff_alpha(permuted.tolist(), level) == pytest.approx(alpha, abs=TOL)
    # relabelling values: any bijection for nominal, monotone maps for ordinal,
    # affine maps for interval, scaling for ratio
    maps = {
        "nominal": lambda v: f"label-{(v * 7) % 5}",
        "ordinal": lambda v: v**3 + 100,
        "interval": lambda v: -2.5 * v + 11,
        "ratio": lambda v: 4 * v,
    }
    mapped = [[None if v is None else maps[level](v) for v in row] for row in rows]
    assert krippendorff_alpha(mapped, level) == pytest.approx(alpha, abs=TOL)
    assert alpha <= 1.0 + TOL


def test_alpha_no_pairable_values():
    with pytest.raises(ValueError, match="at least 2 pairable values"):
        krippendorff_alpha([[None, None], [NAN, NAN]])
    with pytest.raises(ValueError, match="at least 2 pairable values"):
        krippendorff_alpha([[1, 2, 3]])  # a single rater
    with pytest.raises(ValueError, match="at least 2 pairable values"):
        krippendorff_alpha([[1, None], [None, 2]])  # every item rated once
    with pytest.raises(ValueError, match="at least 2 pairable values"):
        krippendorff_alpha(np.empty((3, 0)))
    with pytest.raises(ValueError, match="at least 2 pairable values"):
        krippendorff_alpha([])


@needs_krippendorff
def test_alpha_no_pairable_values_reference_also_raises():
    for data in ([[NAN, NAN], [NAN, NAN]], [[1, NAN], [NAN, 2]]):
        with pytest.raises(ValueError):
            krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")


def test_alpha_single_item():
    # one item, two different ratings: o_ab = o_ba = 1, n = 2 -> α = 1 − 1·2/2 = 0
    for level in LEVELS:
        assert krippendorff_alpha([[1], [2]], level) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="without variation"):
        krippendorff_alpha([[3], [3], [None]])


def test_alpha_constant_data_raises():
    for level in LEVELS:
        with pytest.raises(ValueError, match="without variation"):
            krippendorff_alpha([[2, 2, 2], [2, 2, None]], level)
    # variation only in an unpairable item: the reference returns NaN here, we raise
    with pytest.raises(ValueError, match="without variation"):
        krippendorff_alpha([[1, 1, 2], [1, 1, None]])
    # ratio: c + k = 0 counts as distance 0, so ±1 carry no variation either
    with pytest.raises(ValueError, match="expected disagreement is 0"):
        krippendorff_alpha([[1, -1], [1, -1]], "ratio")


@needs_krippendorff
def test_alpha_constant_data_reference_behaviour():
    # documents the reference behaviour our ValueError replaces
    with pytest.raises(ValueError):
        krippendorff.alpha(reliability_data=[[2, 2, 2], [2, 2, NAN]], level_of_measurement="nominal")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(krippendorff.alpha(reliability_data=[[1, 1, 2], [1, 1, NAN]],
                                             level_of_measurement="nominal"))


def test_alpha_input_errors():
    with pytest.raises(ValueError, match="row lengths"):
        krippendorff_alpha([[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="2-D"):
        krippendorff_alpha(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="2-D"):
        krippendorff_alpha([1, 2, 3])
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2], [1, 2]], "cardinal")
    for level in ("ordinal", "interval", "ratio"):
        with pytest.raises(ValueError, match="numeric"):
            krippendorff_alpha([["a", "b"], ["a", "a"]], level)
    with pytest.raises(ValueError, match="finite"):
        krippendorff_alpha([[1.0, math.inf], [1.0, 2.0]], "interval")


# --------------------------------------------------------------------------- panels


PANEL = {
    "a": {1: "x", 2: "y", 3: "x", 4: "x", 5: "z"},
    "b": {1: "x", 2: "y", 3: "y", 4: "x"},
    "c": {1: "x", 2: "x", 3: "y", 6: "q"},
    "d": {1: "y", 2: "y", 6: None},
    "e": {},
}


def test_pairwise_agreement_matrix_hand():
    raters, matrix, counts = pairwise_agreement_matrix(PANEL)
    assert raters == ["a", "b", "c", "d", "e"]
    nan = np.nan
    expected = np.array([
        [1.0, 3 / 4, 1 / 3, 1 / 2, nan],  # a–b: items 1-4, disagree on 3; a–c: 1,2,3 agree on 1; a–d: 1,2
        [3 / 4, 1.0, 2 / 3, 1 / 2, nan],  # b–c: 1 ✓, 2 ✗, 3 ✓; b–d: 1 ✗, 2 ✓
        [1 / 3, 2 / 3, 1.0, 0.0, nan],  # c–d: 1 ✗, 2 ✗ (d's item 6 is missing)
        [1 / 2, 1 / 2, 0.0, 1.0, nan],
        [nan, nan, nan, nan, nan],
    ])
    np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(counts, [
        [5, 4, 3, 2, 0],
        [4, 4, 3, 2, 0],
        [3, 3, 4, 2, 0],
        [2, 2, 2, 2, 0],
        [0, 0, 0, 0, 0],
    ])


@pytest.mark.parametrize("seed", range(4))
def test_pairwise_agreement_matrix_matches_percent_agreement(seed):
    rng = np.random.default_rng(seed)
    n_raters, n_items = 5, 60
    ratings = {
        f"r{r}": {f"item{i}": int(rng.integers(0, 3)) for i in range(n_items) if rng.random() < 0.6}
        for r in range(n_raters)
    }
    raters, matrix, counts = pairwise_agreement_matrix(ratings)
    assert np.array_equal(matrix, matrix.T, equal_nan=True) and np.array_equal(counts, counts.T)
    items = [f"item{i}" for i in range(n_items)]
    for i, ri in enumerate(raters):
        for j, rj in enumerate(raters):
            if i == j:
                continue
            a = [ratings[ri].get(item) for item in items]
            b = [ratings[rj].get(item) for item in items]
            assert matrix[i, j] == pytest.approx(percent_agreement(a, b), abs=1e-12)
            assert counts[i, j] == sum(x is not None and y is not None for x, y in zip(a, b))


def test_rater_quality_hand():
    q = rater_quality(PANEL)
    assert list(q) == ["a", "b", "c", "d", "e"]
    # a: 1 ✓ (x,x,y→x), 2 ✓ (y,x,y→y), 3 ✗ (y,y→y), 4 ✓ (x), 5 skipped (nobody else)
    assert q["a"] == {"agreement_with_consensus": 3 / 4, "items": 4}
    # b: 1 ✓, 2 ✓, 3 skipped (others tie x/y), 4 ✓
    assert q["b"] == {"agreement_with_consensus": 1.0, "items": 3}
    # c: 1 ✓, 2 ✗ (y,y,y), 3 skipped (tie), 6 skipped (d's label is missing)
    assert q["c"] == {"agreement_with_consensus": 1 / 2, "items": 2}
    # d: 1 ✗ (x,x,x), 2 ✓ (y,y,x→y); item 6 is not rated
    assert q["d"] == {"agreement_with_consensus": 1 / 2, "items": 2}
    assert q["e"]["items"] == 0 and math.isnan(q["e"]["agreement_with_consensus"])


def test_rater_quality_flags_adversarial_rater():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, size=100)
    ratings = {
        f"honest{r}": {i: int(t if rng.random() < 0.9 else 1 - t) for i, t in enumerate(truth)} for r in range(5)
    }
    ratings["flipper"] = {i: int(1 - t) for i, t in enumerate(truth)}
    q = rater_quality(ratings)
    # 5 other raters per item: never a tie, so every item is scored
    assert all(q[r]["items"] == 100 for r in ratings)
    assert q["flipper"]["agreement_with_consensus"] < 0.1
    assert all(q[f"honest{r}"]["agreement_with_consensus"] > 0.75 for r in range(5))
    # NaN labels count as not rated
    ratings["flipper"][0] = NAN
    assert rater_quality(ratings)["flipper"]["items"] == q["flipper"]["items"] - 1
