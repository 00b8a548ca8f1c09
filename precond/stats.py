"""Counters for the numerical fallbacks a run took (jitter → float64 → keep the old basis)."""

from __future__ import annotations

import collections
import warnings


class FallbackCounter:
    """Counts each fallback rung and warns once per rung, so a failure is never silent nor noisy."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def count(self, rung: str, message: str) -> None:
        if self.counts[rung] == 0:
            warnings.warn(f"precond: {message} (counted in optimizer.stats()['{rung}'], warned once)", RuntimeWarning, stacklevel=3)
        self.counts[rung] += 1

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
