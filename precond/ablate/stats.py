"""Paired differences between two variants over the same seeds, with a Student-t confidence interval.

Runs with the same seed share the initial weights and the order of the training batches, so the difference of
two variants' final losses seed by seed, ``d_s = L_a(s) − L_b(s)``, removes what the seed does to both. With
``n`` seeds, mean ``d̄`` and sample standard deviation ``s_d``, the interval at level ``1 − α`` is

    d̄ ± t_{1−α/2, n−1} · s_d / √n

(the paired t interval, e.g. Wasserman, *All of Statistics*, §10). When it contains 0 the difference is **not
significant** at that level. The Student-t quantile is computed here (numpy and scipy are not needed): the
distribution function of ``t`` with ``ν`` degrees of freedom is, for ``t ≥ 0``,

    F(t) = 1 − ½ · I_{ν/(ν+t²)}(ν/2, ½)

with ``I_x(a, b)`` the regularized incomplete beta function (Abramowitz & Stegun 26.7.1), evaluated by its
continued fraction (A&S 26.5.8) and inverted by bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import attrs


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (A&S 26.5.8), by the modified Lentz method; converges fast for
    ``x < (a + 1)/(a + b + 2)``."""
    tiny = 1e-300

    def guard(value: float) -> float:
        return tiny if abs(value) < tiny else value

    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    result = d
    for m in range(1, 500):
        # even term d_{2m} = m (b − m) x / ((a + 2m − 1)(a + 2m)),
        # odd term d_{2m+1} = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b  # I_x(a, b) = 1 − I_{1−x}(b, a)


def t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@attrs.frozen
class Interval:
    """Mean paired difference ``mean`` over ``n`` seeds with its interval ``[low, high]`` at ``level`` (both
    ``None`` for a single seed)."""

    mean: float
    n: int
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def significant(self) -> bool | None:
        """Whether the interval excludes 0 (``None`` without an interval)."""
        if self.low is None or self.high is None:
            return None
        return not self.low <= 0.0 <= self.high

    def text(self) -> str:
        """``+0.0123 [−0.0040, +0.0286] not significant`` (lower loss is better, so ``−`` means better)."""
        if self.low is None or self.high is None:
            return f"{self.mean:+.4f} (1 seed: no interval)"
        verdict = "not significant" if not self.significant else ("better" if self.high < 0 else "worse")
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] {verdict}"


def paired_interval(differences: Sequence[float], level: float = 0.95) -> Interval | None:
    """The paired-t interval of ``differences`` (one per seed); ``None`` for no differences."""
    values = [float(d) for d in differences]
    if not values:
        return None
    mean = statistics.mean(values)
    if len(values) < 2:
        return Interval(mean, 1, None, None, level)
    half = t_quantile(0.5 + level / 2.0, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, len(values), mean - half, mean + half, level)
