"""Paired differences between two variants over the same seeds, with a Student-t confidence interval.

Runs with the same seed share the initial weights and the order of the training batches, so the difference of
two variants' final losses seed by seed, ``d_s = L_a(s) − L_b(s)``, removes what the seed does to both. With
``n`` seeds, mean ``d̄`` and sample standard deviation ``s_d``, the interval at level ``1 − α`` is

    d̄ ± t_{1−α/2, n−1} · s_d / √n

(the paired t interval, e.g. Wasserman, *All of Statistics*, §10). When it contains 0 the difference is **not
significant** at that level. The quantile and the interval are ``scipy.stats.t``'s (``ppf`` and ``interval``);
scipy comes with the ``demo`` and ``test`` extras and is imported only when an interval is asked for (several
seeds), so a one-seed ablation runs without it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import attrs

SCIPY_MISSING = "confidence intervals need scipy: pip install scipy (or pip install -e '.[demo]')"


def _student_t() -> Any:
    """``scipy.stats.t``, or an ``ImportError`` saying how to install scipy."""
    try:
        from scipy import stats
    except ImportError:
        raise ImportError(SCIPY_MISSING) from None
    return stats.t


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p!r}, df={df!r}")
    return float(_student_t().ppf(p, df))


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
    """The paired-t interval of ``differences`` (one per seed; ``scipy.stats.t.interval``); ``None`` for no
    differences. Several seeds without scipy raise ``ImportError`` (:data:`SCIPY_MISSING`)."""
    values = [float(d) for d in differences]
    if not values:
        return None
    mean = statistics.mean(values)
    if len(values) < 2:
        return Interval(mean, 1, None, None, level)
    student_t = _student_t()
    scale = statistics.stdev(values) / math.sqrt(len(values))
    if scale == 0.0:  # identical differences: scipy wants a positive scale; the interval is the point
        return Interval(mean, len(values), mean, mean, level)
    low, high = student_t.interval(level, len(values) - 1, loc=mean, scale=scale)
    return Interval(mean, len(values), float(low), float(high), level)
