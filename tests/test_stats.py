"""rcp_lib.stats against independent references: scipy's own t-tests (ttest_ind with equal_var=False, ttest_rel)
and the t quantile the n = 3 case needs."""

import math

import pytest
from scipy import stats as sps

from rcp_lib.stats import NOT_SEPARABLE, order, paired, welch

A = [88.77, 119.2, 87.2]
B = [101.3, 104.9, 126.0]


@pytest.mark.parametrize("log_scale", [True, False])
def test_welch_matches_scipy(log_scale):
    f = (lambda v: [math.log(x) for x in v]) if log_scale else list
    ref = sps.ttest_ind(f(A), f(B), equal_var=False)
    r = welch(A, B, log_scale=log_scale)
    assert r.t == pytest.approx(float(ref.statistic), rel=1e-12)
    assert r.p == pytest.approx(float(ref.pvalue), rel=1e-10)
    assert r.df == pytest.approx(float(ref.df), rel=1e-12)


def test_paired_matches_scipy():
    ref = sps.ttest_rel([math.log(x) for x in A], [math.log(x) for x in B])
    r = paired(A, B)
    assert r.t == pytest.approx(float(ref.statistic), rel=1e-12) and r.p == pytest.approx(float(ref.pvalue), rel=1e-10)
    assert r.df == 2


def test_two_standard_errors_is_not_significant_at_three_seeds():
    """A difference of 2.5 SE at n = 3 per row (Welch df = 4 with equal spreads) is not significant at 5 %: the 97.5 %
    t quantile at df 4 is 2.78 (at df 2: 4.30), so the old 2-SE rule stated orders the test does not support."""
    assert sps.t.ppf(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    a = [1.0, 2.0, 3.0]
    shift = 2.5 * math.sqrt(2 / 3)  # 2.5 standard errors of the difference (each SE = 1/sqrt(3))
    b = [x + shift for x in a]
    r = welch(a, b, log_scale=False)
    assert r.t == pytest.approx(-2.5) and r.df == pytest.approx(4.0) and r.p > 0.05
    assert order("a", a, "b", b, log_scale=False).startswith(NOT_SEPARABLE)


def test_order_phrases():
    far = [10.0, 10.1, 9.9]
    near = [20.0, 20.2, 19.8]
    s = order("x", far, "y", near)
    assert s.startswith("x < y (Welch p = ") and "n = 3, 3" in s
    assert order("y", near, "x", far).startswith("x < y")
    assert order("x", [10.0], "y", near) == f"{NOT_SEPARABLE} (n = 1, 3)"
    with pytest.raises(ValueError):
        welch([1.0, -1.0], [1.0, 2.0])  # log scale of a non-positive value
    assert welch([2.0, 2.0], [3.0, 3.0]).p == 0.0 and welch([2.0, 2.0], [2.0, 2.0]).p == 1.0
