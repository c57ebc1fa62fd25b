"""Simulated labelers, the tiny task's gold score, and EOS handling of generation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tether.feedback.simulated import (
    SimulatedLabeler,
    calibrate_temperature,
    expected_agreement,
    percent_agreement_pairs,
)
from tether.rollout.generate import _response_mask
from tether.tasks import get_task
from tether.tasks.tiny import gold_score, parse_prompt


def test_expected_agreement_hand():
    # gap 0 → p = 1/2 → agreement 1/2; gap τ·ln 3 → p = 3/4 → 9/16 + 1/16 = 5/8
    assert expected_agreement([0.0], 1.0) == pytest.approx(0.5, abs=1e-12)
    assert expected_agreement([math.log(3.0)], 1.0) == pytest.approx(0.625, abs=1e-12)
    assert expected_agreement([0.0, math.log(3.0)], 1.0) == pytest.approx(0.5625, abs=1e-12)


def test_calibration_hits_target_and_is_monotone():
    rng = random.Random(0)
    gaps = [abs(rng.gauss(0, 0.2)) for _ in range(500)]
    tau, got = calibrate_temperature(gaps, 0.72)
    assert got == pytest.approx(0.72, abs=1e-6)
    assert expected_agreement(gaps, tau * 2) < got < expected_agreement(gaps, tau / 2)


def test_calibration_with_only_ties_reports_what_is_reachable():
    tau, got = calibrate_temperature([0.0] * 10, 0.72)
    assert got == pytest.approx(0.5)


def test_labeler_pairwise_marginal_is_bradley_terry():
    # P(a ≻ b) = σ((g_a − g_b)/τ) for the Gumbel (Plackett–Luce) ranking
    tau, gold = 0.5, [0.6, 0.2, 0.0]
    lab = SimulatedLabeler("r", tau, seed=1)
    n, wins = 20000, 0
    for _ in range(n):
        order = lab.rank(gold)
        wins += order.index(0) < order.index(1)
    expected = 1 / (1 + math.exp(-(0.6 - 0.2) / tau))
    assert abs(wins / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_two_labelers_agree_as_calibrated():
    rng = random.Random(2)
    groups = [[rng.random() for _ in range(4)] for _ in range(1500)]
    gaps = [abs(g[i] - g[j]) for g in groups for i in range(4) for j in range(i + 1, 4)]
    tau, target = calibrate_temperature(gaps, 0.72)
    a, b = SimulatedLabeler("a", tau, 3), SimulatedLabeler("b", tau, 4)
    agree = total = 0
    for g in groups:
        x, n = percent_agreement_pairs(a.rank(g), b.rank(g))
        agree, total = agree + x, total + n
    # 9000 pairs → s.e. ≈ 0.005 (pairs within a ranking are correlated; allow 0.025)
    assert abs(agree / total - target) < 0.025


def test_percent_agreement_pairs_hand():
    assert percent_agreement_pairs([0, 1, 2], [0, 1, 2]) == (3, 3)
    assert percent_agreement_pairs([0, 1, 2], [2, 1, 0]) == (0, 3)
    assert percent_agreement_pairs([0, 1, 2], [1, 0, 2]) == (2, 3)


def test_tiny_gold_hand_values():
    p = "write four words about fruits and tools"
    assert parse_prompt(p) == (4, ["fruits", "tools"])
    # all on topic, both topics, right length, no stutter → 1.0
    assert gold_score(p, "apple saw fig drill") == pytest.approx(1.0)
    # on 2/4, coverage 1/2, length 4/4, stutter 1/4 ("pear pear")
    assert gold_score(p, "pear pear cat dog") == pytest.approx(0.5 * 0.5 + 0.2 * 0.5 + 0.3 - 0.5 * 0.25)
    # length 2 of 4 → length_fit 0.5; one topic of two
    assert gold_score(p, "apple fig") == pytest.approx(0.5 + 0.1 + 0.15)
    assert gold_score(p, "") == -0.5
    with pytest.raises(ValueError):
        parse_prompt("tell me a story")


def test_tiny_task_split_is_fixed_and_disjoint():
    a, b = get_task("tiny"), get_task("tiny")
    assert a.heldout_prompts() == b.heldout_prompts()
    assert not set(a.heldout_prompts()) & set(a.train_prompts())
    assert len(a.heldout_prompts()) == 128
    demos = a.demonstrations(50, seed=0)
    assert all(d["prompt"] in set(a.train_prompts()) for d in demos)
    assert demos == a.demonstrations(50, seed=0)


def test_response_mask_stops_at_first_eos():
    eos, _pad = 3, 0
    ids = torch.tensor([[5, 6, 3, 0, 0], [5, 3, 0, 0, 0], [5, 6, 7, 8, 9], [3, 0, 0, 0, 0]])
    mask, ended = _response_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, True, False, True]
