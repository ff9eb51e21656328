"""Two-sample tests for stating an order between result rows (pure functions, no torch).

At n = 3 seeds a "two standard errors" rule is a z-rule: Welch's df is between 2 and 4 (4 with equal spreads), so the
two-sided 95 % t quantile is between 2.8 and 4.3, and the rule claims more than it tests. Every order the tables, notebooks and README state comes from here:

* :func:`welch`: Welch's unequal-variance t-test of two independent samples;
* :func:`paired`: the paired t-test of per-seed differences (use it where one seed sets the same R1 signs,
  calibration windows and data order for both rows);
* :func:`mcnemar` / :func:`accuracy_order`: the exact McNemar test of two rows' per-document zero-shot outcomes;
* :func:`order`: the sentence a table prints: ``"A < B (Welch p = 0.012, n = 3, 3)"`` or ``"not separable at this
  budget (p = 0.21)"``.

Perplexities are compared on the log scale (``log_scale=True``, the default): a ratio of perplexities is the natural
effect size, and log perplexity is a mean NLL.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

NOT_SEPARABLE = "not separable at this budget"
ALPHA = 0.05


@dataclass(frozen=True)
class TTest:
    """Result of a two-sided t-test of ``mean(a) - mean(b)``.

    Attributes:
        diff: mean(a) - mean(b) (of the log values when the test was on the log scale).
        se: standard error of ``diff``. t: ``diff / se``. df: degrees of freedom (Welch-Satterthwaite or n - 1).
        p: two-sided p-value from the t distribution. n_a, n_b: sample sizes. kind: "welch" or "paired".
    """

    diff: float
    se: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int
    kind: str


def _values(xs: Sequence[float], log_scale: bool) -> list[float]:
    vals = [float(x) for x in xs]
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"non-finite value in {vals}")
    if log_scale:
        if any(v <= 0 for v in vals):
            raise ValueError(f"log scale needs positive values, got {vals}")
        vals = [math.log(v) for v in vals]
    return vals


def _two_sided_p(t: float, df: float) -> float:
    from scipy.stats import t as student_t

    return float(2.0 * student_t.sf(abs(t), df))


def welch(a: Sequence[float], b: Sequence[float], log_scale: bool = True) -> TTest:
    """Welch's t-test (unequal variances) of two independent samples of at least 2 values each.

    ``se = sqrt(va/na + vb/nb)``, ``df = se^4 / ((va/na)^2/(na-1) + (vb/nb)^2/(nb-1))`` (Welch-Satterthwaite), with
    sample variances ``va, vb``. Two samples without any spread give ``p = 0`` if their means differ, else 1.

    Raises:
        ValueError: fewer than 2 values in a sample, or a non-finite (or, on the log scale, non-positive) value.
    """
    x, y = _values(a, log_scale), _values(b, log_scale)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Welch's test needs >= 2 values per sample, got {len(x)} and {len(y)}")
    va, vb = statistics.variance(x) / len(x), statistics.variance(y) / len(y)
    diff = statistics.fmean(x) - statistics.fmean(y)
    se = math.sqrt(va + vb)
    if se == 0:
        return TTest(diff, 0.0, math.copysign(math.inf, diff) if diff else 0.0, float(len(x) + len(y) - 2),
                     0.0 if diff else 1.0, len(x), len(y), "welch")
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    t = diff / se
    return TTest(diff, se, t, df, _two_sided_p(t, df), len(x), len(y), "welch")


def paired(a: Sequence[float], b: Sequence[float], log_scale: bool = True) -> TTest:
    """Paired t-test of the differences ``a_i - b_i`` (the same seed in both rows), ``df = n - 1``.

    Raises:
        ValueError: samples of different lengths or fewer than 2 pairs, or a value as in :func:`welch`.
    """
    x, y = _values(a, log_scale), _values(b, log_scale)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a paired test needs two samples of the same length >= 2, got {len(x)} and {len(y)}")
    d = [u - v for u, v in zip(x, y)]
    diff = statistics.fmean(d)
    se = statistics.stdev(d) / math.sqrt(len(d))
    if se == 0:
        return TTest(diff, 0.0, math.copysign(math.inf, diff) if diff else 0.0, float(len(d) - 1),
                     0.0 if diff else 1.0, len(x), len(y), "paired")
    t = diff / se
    return TTest(diff, se, t, float(len(d) - 1), _two_sided_p(t, len(d) - 1), len(x), len(y), "paired")


def order(name_a: str, a: Sequence[float], name_b: str, b: Sequence[float], kind: str = "welch",
          alpha: float = ALPHA, log_scale: bool = True) -> str:
    """The order of two rows as one phrase: ``"A < B (Welch p = 0.012, n = 3, 3)"`` when the two-sided test gives
    ``p < alpha``, else ``"not separable at this budget (Welch p = 0.21, n = 3, 3)"``; with fewer than 2 values in a
    sample (no test possible): ``"not separable at this budget (n = 1, 3)"``; a row with a non-finite (diverged) or,
    on the log scale, non-positive value: ``"not comparable: <name> has a diverged run (...)"``. Paired samples of
    different lengths raise ValueError."""
    if kind not in ("welch", "paired"):
        raise ValueError(f"kind must be 'welch' or 'paired', got {kind!r}")
    for name, xs in ((name_a, a), (name_b, b)):
        if any(not math.isfinite(float(x)) or (log_scale and float(x) <= 0) for x in xs):
            return f"not comparable: {name} has a diverged run ({', '.join(f'{float(x):.4g}' for x in xs)})"
    if len(a) < 2 or len(b) < 2:
        return f"{NOT_SEPARABLE} (n = {len(a)}, {len(b)})"
    r = (welch if kind == "welch" else paired)(a, b, log_scale)
    label = "Welch" if kind == "welch" else "paired"
    stat = f"{label} p = {r.p:.2g}, n = {r.n_a}, {r.n_b}"
    if r.p >= alpha:
        return f"{NOT_SEPARABLE} ({stat})"
    lo, hi = (name_a, name_b) if r.diff < 0 else (name_b, name_a)
    return f"{lo} < {hi} ({stat})"


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two classifiers scored on the same documents.

    Attributes:
        only_a: documents that ``a`` gets right and ``b`` wrong. only_b: the reverse (the discordant pairs).
        n: documents. p: two-sided exact p-value (binomial, ``min(1, 2·P[X ≤ min(only_a, only_b)])`` with
        X ~ Bin(only_a + only_b, 1/2); 1 when there is no discordant pair).
    """

    only_a: int
    only_b: int
    n: int
    p: float


def mcnemar(a: Sequence[bool | int], b: Sequence[bool | int]) -> McNemar:
    """Exact two-sided McNemar test of per-document outcomes ``a`` and ``b`` (truthy = correct), same length and
    document order (ValueError otherwise). Exact: the discordant pairs are few at these sizes, where the chi-square
    approximation is poor."""
    if len(a) != len(b):
        raise ValueError(f"McNemar needs the same documents for both rows, got {len(a)} and {len(b)} outcomes")
    only_a = sum(1 for x, y in zip(a, b) if bool(x) and not bool(y))
    only_b = sum(1 for x, y in zip(a, b) if bool(y) and not bool(x))
    k, m = min(only_a, only_b), only_a + only_b
    if m == 0:
        return McNemar(only_a, only_b, len(a), 1.0)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m  # exact integers: no overflow at any m
    return McNemar(only_a, only_b, len(a), min(1.0, 2.0 * tail))


def accuracy_order(name_a: str, a: Sequence[bool | int], name_b: str, b: Sequence[bool | int],
                   alpha: float = ALPHA) -> str:
    """The order of two rows' accuracies on the same documents as one phrase: ``"A > B (McNemar p = 0.003,
    discordant 14 / 3 of 878)"`` when the exact McNemar test gives ``p < alpha``, else ``"not separable at this budget
    (McNemar p = 0.4, ...)"``."""
    r = mcnemar(a, b)
    stat = f"McNemar p = {r.p:.2g}, discordant {r.only_a} / {r.only_b} of {r.n}"
    if r.p >= alpha:
        return f"{NOT_SEPARABLE} ({stat})"
    hi, lo = (name_a, name_b) if r.only_a > r.only_b else (name_b, name_a)
    return f"{hi} > {lo} ({stat})"
