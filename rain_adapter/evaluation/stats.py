"""Small-sample statistics for rates measured on a prompt set: intervals and sample sizes.

A rate here is k successes out of n scored prompts (compliance, accuracy, format validity).

- :func:`wilson`: the Wilson score interval (95 % by default). Unlike the normal approximation
  p ± z·√(p(1−p)/n) it stays inside [0, 1] and is not degenerate at k = 0 or k = n, which is where
  a λ sweep's rates live (format validity 1.0, compliance 0.0 at λ = 0).
- :func:`n_to_separate`: prompts per arm a two-sided two-proportion z-test at level α needs to tell
  rates p₁ and p₂ apart with the given power (the classical formula, Fleiss §4):
  n = (z_{α/2}·√(2·p̄(1−p̄)) + z_β·√(p₁(1−p₁) + p₂(1−p₂)))² / (p₁ − p₂)², p̄ = (p₁+p₂)/2.
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["n_to_separate", "wilson", "z_value"]


def z_value(confidence: float) -> float:
    """The two-sided standard-normal quantile for ``confidence`` (0.95 → 1.96)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of k successes in n trials; ``(nan, nan)`` when n = 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return float("nan"), float("nan")
    z = z_value(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 / k = n the bound is exactly 0 / 1 (the formula gives it only up to rounding)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def n_to_separate(p1: float, p2: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Prompts per arm to separate rates ``p1`` and ``p2`` (see the module doc); ``inf`` when equal
    or when either is NaN."""
    if p1 != p1 or p2 != p2 or p1 == p2:
        return math.inf
    za = z_value(1.0 - alpha)
    zb = NormalDist().inv_cdf(power)
    pbar = (p1 + p2) / 2.0
    num = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil((num / (p1 - p2)) ** 2)
