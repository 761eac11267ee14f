"""Interval and paired-test arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grpo.stats import mcnemar_exact, mean_sem, paired_bootstrap, wilson_interval, z_value


def test_z_value():
    assert z_value(0.95) == pytest.approx(1.959963984540054, rel=1e-12)
    assert z_value(0.0) == 0.0
    with pytest.raises(ValueError):
        z_value(1.0)


def test_wilson_8_of_10_by_hand():
    # z = 1.959964: z² = 3.841459; z²/n = 0.3841459; centre = (0.8 + 0.192073)/1.384146 = 0.71674
    # half = 1.959964·√(0.016 + 0.0096036)/1.384146 = 1.959964·0.160011/1.384146 = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.71674 - 0.22658, abs=2e-5)  # 0.49016
    assert high == pytest.approx(0.71674 + 0.22658, abs=2e-5)  # 0.94332
    # the textbook value (Newcombe 1998, Table I style): 0.4902 to 0.9433
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


def test_wilson_edges():
    low, high = wilson_interval(0, 4)  # p = 0: low 0, high z²/n/(1+z²/n) = 0.9604/1.9604
    assert low == 0.0 and high == pytest.approx(3.841459 / 4 / (1 + 3.841459 / 4), abs=1e-6)
    assert wilson_interval(4, 4)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    assert wilson_interval(3, 4, confidence=0.0) == (0.75, 0.75)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_mean_sem_by_hand():
    out = mean_sem([0.5, 0.7, 0.9])  # mean 0.7, s = 0.2, sem = 0.2/√3
    assert out["mean"] == pytest.approx(0.7)
    assert out["sem"] == pytest.approx(0.2 / math.sqrt(3))
    assert mean_sem([0.4])["sem"] == 0.0
    assert math.isnan(mean_sem([])["mean"])


def test_mcnemar_by_hand():
    # 1 vs 6 discordant: 2·(C(7,0)+C(7,1))/2⁷ = 2·8/128 = 0.125
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0


def test_paired_bootstrap_of_a_constant_difference_is_exact():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], dtype=float)
    b = a - 0.25  # b is a shifted copy: the difference is 0.25 on every resample

    def diff(idx):
        return float(a[idx].mean() - b[idx].mean())

    out = paired_bootstrap(diff, [np.arange(4), np.arange(4, 8)], samples=200)
    assert out["estimate"] == pytest.approx(0.25)
    assert out["low"] == pytest.approx(0.25) and out["high"] == pytest.approx(0.25)
    assert out["share_at_or_below_zero"] == 0.0


def test_paired_bootstrap_keeps_stratum_sizes():
    seen = []

    def stat(idx):
        seen.append(((idx < 3).sum(), (idx >= 3).sum()))
        return 0.0

    paired_bootstrap(stat, [np.arange(3), np.arange(3, 10)], samples=20)
    assert set(seen) == {(3, 7)}
