"""Simulated labelers for tasks with a gold score.

A labeler ranks K responses by ``gold / τ + Gumbel noise`` (best first). That is a
Plackett–Luce draw whose pairwise marginals are Bradley–Terry: P(a ≻ b) = σ((g_a − g_b)/τ).
Two independent labelers therefore agree on a pair with probability p² + (1 − p)², and
τ is chosen by bisection so that the expected agreement over the actual pairs matches a
target (InstructGPT reports ~73% between labelers).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

__all__ = ["expected_agreement", "calibrate_temperature", "SimulatedLabeler", "percent_agreement_pairs"]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def expected_agreement(gaps: list[float], tau: float) -> float:
    """Expected share of pairs on which two BT(τ) labelers agree, for these gold gaps."""
    if not gaps:
        return 1.0
    total = 0.0
    for gap in gaps:
        p = _sigmoid(gap / tau)
        total += p * p + (1 - p) * (1 - p)
    return total / len(gaps)


def calibrate_temperature(gaps: list[float], target: float, lo: float = 1e-4, hi: float = 1e3) -> tuple[float, float]:
    """τ such that ``expected_agreement(gaps, τ) ≈ target``; returns (τ, achieved agreement).

    Agreement falls as τ grows. If even τ → 0 cannot reach the target (many ties, which two
    labelers split at random), the smallest τ is returned with the agreement it reaches.
    """
    if expected_agreement(gaps, lo) <= target:
        return lo, expected_agreement(gaps, lo)
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if expected_agreement(gaps, mid) > target:
            lo = mid
        else:
            hi = mid
    tau = math.sqrt(lo * hi)
    return tau, expected_agreement(gaps, tau)


@dataclass
class SimulatedLabeler:
    rater_id: str
    tau: float
    seed: int

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def rank(self, gold: list[float]) -> list[int]:
        """Indices of the responses, best first, under BT noise of temperature τ."""
        noisy = []
        for i, g in enumerate(gold):
            u = min(max(self._rng.random(), 1e-12), 1 - 1e-12)
            noisy.append((g / self.tau - math.log(-math.log(u)), i))
        return [i for _, i in sorted(noisy, reverse=True)]


def percent_agreement_pairs(order_a: list[int], order_b: list[int]) -> tuple[int, int]:
    """(agreeing pairs, all pairs) between two rankings of the same K items."""
    pos_a = {item: r for r, item in enumerate(order_a)}
    pos_b = {item: r for r, item in enumerate(order_b)}
    items = sorted(pos_a)
    agree = total = 0
    for x in range(len(items)):
        for y in range(x + 1, len(items)):
            i, j = items[x], items[y]
            total += 1
            agree += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
    return agree, total
