"""Small-sample statistics for per-group figures: intervals, seed spreads, paired comparisons.

Groups are small (GlobalOpinionQA's China has a handful of test pairs), so every per-group
accuracy the project reports carries its number of pairs and an interval, and comparisons of two
models or methods are paired over the same pairs (and seeds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import NormalDist

import numpy as np


def z_value(confidence: float) -> float:
    """The two-sided standard normal quantile: 1.959964 for 0.95; 0 for confidence 0."""
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if confidence == 0.0:
        return 0.0
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n.

        centre = (p + z²/2n) / (1 + z²/n),  half = z √(p(1−p)/n + z²/4n²) / (1 + z²/n)

    Unlike p ± z√(p(1−p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1. ``n = 0``
    gives (nan, nan); ``confidence = 0`` gives (p, p).
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    p, z = successes / n, z_value(confidence)
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_sem(values: Sequence[float]) -> dict[str, float | list[float]]:
    """``{"mean", "sem", "per_seed"}``: the standard error is s/√n with s the sample standard
    deviation (ddof 1); 0 for a single value, NaN for none."""
    xs = [float(v) for v in values]
    if not xs:
        return {"mean": math.nan, "sem": math.nan, "per_seed": []}
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return {"mean": mean, "sem": 0.0, "per_seed": xs}
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return {"mean": mean, "sem": math.sqrt(var / len(xs)), "per_seed": xs}


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float],
    strata: Sequence[np.ndarray],
    *,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Percentile bootstrap of ``statistic`` over paired items, resampled within strata.

    ``strata``: index arrays (e.g. the test pairs of each group, or of each (seed, group)); each
    resample draws, with replacement, as many indices from every stratum as it holds, and calls
    ``statistic(indices)`` on their concatenation, where the caller evaluates *both* models on
    the same indices (that is what makes the comparison paired). Returns the point estimate on
    all items, the interval and the share of resamples ≤ 0 (a one-sided bootstrap p-value for a
    difference).
    """
    rng = np.random.default_rng(seed)
    everything = np.concatenate([np.asarray(s, dtype=np.int64) for s in strata])
    point = float(statistic(everything))
    draws = np.empty(samples)
    for b in range(samples):
        picked = [np.asarray(s)[rng.integers(0, len(s), len(s))] for s in strata if len(s)]
        draws[b] = statistic(np.concatenate(picked))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return {
        "estimate": point,
        "low": float(low),
        "high": float(high),
        "share_at_or_below_zero": float((draws <= 0).mean()),
        "samples": samples,
        "confidence": confidence,
    }


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts (a right where b is wrong,
    and the reverse): a binomial test of only_a against Binomial(only_a + only_b, 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)
