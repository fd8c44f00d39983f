"""Statistics of the experiment analysis (``recsys.ml.experiment_stats``) against independent
computations: a bootstrap over users, the binomial interval, scipy's chi-square."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from recsys.ml.experiment_stats import Z_95, rate, relative_lift, sample_ratio_check


def shoppers(rng: np.random.Generator, users: int, click_through: float, lift: float = 0.0):
    """Lists per user and lists clicked, propensities varying between users."""
    lists = 1 + rng.poisson(3, users)
    propensity = rng.beta(2, 2 / click_through - 2, users) * (1 + lift)
    return rng.binomial(lists, np.minimum(propensity, 1)), lists


def test_one_list_per_user_gives_the_binomial_interval():
    clicked = np.array([1] * 30 + [0] * 170)
    estimate = rate(clicked, np.ones(200))
    p = 30 / 200
    assert estimate.value == pytest.approx(p)
    # the delta method with n - 1 in the variance: the Wald interval up to n / (n - 1)
    assert estimate.high - p == pytest.approx(Z_95 * math.sqrt(p * (1 - p) / 199), rel=1e-9)
    assert (estimate.units, estimate.numerator, estimate.denominator) == (200, 30, 200)


def test_the_delta_method_matches_a_bootstrap_over_users():
    rng = np.random.default_rng(3)
    clicked, lists = shoppers(rng, 3_000, 0.1)
    estimate = rate(clicked, lists)
    draws = rng.integers(0, len(lists), (2_000, len(lists)))
    bootstrap = clicked[draws].sum(axis=1) / lists[draws].sum(axis=1)
    assert math.sqrt(estimate.variance) == pytest.approx(bootstrap.std(), rel=0.08)
    # lists of one shopper are not independent trials: the per-list binomial interval is too narrow
    naive = math.sqrt(estimate.value * (1 - estimate.value) / lists.sum())
    assert math.sqrt(estimate.variance) > 1.04 * naive  # design effect ~ sqrt(1 + (4 - 1) / 21)


def test_lift_interval_matches_a_bootstrap_and_is_significant_only_when_it_excludes_zero():
    rng = np.random.default_rng(5)
    control = shoppers(rng, 4_000, 0.1)
    treated = shoppers(rng, 4_000, 0.1, lift=0.3)
    lift = relative_lift(rate(*treated), rate(*control))
    truth = treated[0].sum() / treated[1].sum() / (control[0].sum() / control[1].sum()) - 1
    assert lift.value == pytest.approx(truth)
    draws = [rng.integers(0, 4_000, (1_000, 4_000)) for _ in range(2)]
    boot = (treated[0][draws[0]].sum(1) / treated[1][draws[0]].sum(1)) / (control[0][draws[1]].sum(1) / control[1][draws[1]].sum(1)) - 1
    assert (lift.high - lift.low) / (2 * Z_95) == pytest.approx(boot.std(), rel=0.1)
    assert lift.significant and lift.low > 0 and lift.p_value < 0.05
    assert lift.high - lift.value > lift.value - lift.low  # a ratio's interval, taken back from the log
    same = relative_lift(rate(*control), rate(*control))
    assert same.value == 0 and not same.significant and same.p_value == pytest.approx(1.0)


def test_degenerate_inputs_give_no_numbers_instead_of_errors():
    assert math.isnan(rate(np.array([]), np.array([])).value)
    assert math.isnan(rate(np.array([1]), np.array([2])).low)
    nothing = rate(np.zeros(50), np.ones(50))
    assert nothing.value == 0 and nothing.variance == 0
    lift = relative_lift(rate(np.ones(50), np.full(50, 2)), nothing)
    assert math.isnan(lift.value) and not lift.significant
    assert lift.to_dict()["value"] is None  # JSON has no nan
    none_clicked = relative_lift(nothing, rate(np.array([1, 0] * 25), np.ones(50)))
    assert none_clicked.value == -1 and none_clicked.significant  # no log of 0: the plain ratio's delta method


def test_sample_ratio_check_is_pearsons_chi_square_over_the_shares():
    check = sample_ratio_check({"control": 5_200, "b": 4_800}, {"control": 0.25, "b": 0.25})
    expected = chisquare([5_200, 4_800], [5_000, 5_000])
    assert check.chi_square == pytest.approx(expected.statistic)
    assert check.p_value == pytest.approx(expected.pvalue)
    assert check.alarm  # 8 sigma-squared at 10,000 users
    three = sample_ratio_check({"a": 2_010, "b": 2_990, "c": 1_000}, {"a": 0.2, "b": 0.3, "c": 0.1})
    assert three.p_value == pytest.approx(chisquare([2_010, 2_990, 1_000], [2_000, 3_000, 1_000]).pvalue)
    assert not three.alarm
    assert sample_ratio_check({}, {"a": 0.5, "b": 0.5}).p_value == 1.0
