"""Counters for the numerical fallbacks a run took (jitter → float64 → keep the old basis)."""

from __future__ import annotations

import collections
import warnings

import torch


class FallbackCounter:
    """Counts each fallback rung and warns once per rung, so a failure is never silent nor noisy.

    Rungs taken inside the step without a host synchronisation (``count_on_device``) are accumulated in device
    tensors and read, with a synchronisation, only when ``as_dict()`` is called.
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.device_counts: dict[str, torch.Tensor] = {}

    def count_on_device(self, rung: str, failures: torch.Tensor) -> None:
        """Add the number of True entries of ``failures`` to ``rung`` without synchronising."""
        total = failures.sum(dtype=torch.int64)
        if rung in self.device_counts and self.device_counts[rung].device == total.device:
            self.device_counts[rung] += total
        else:
            self.device_counts[rung] = total.clone()

    def count(self, rung: str, message: str) -> None:
        if self.counts[rung] == 0:
            warnings.warn(
                f"precond: {message} (counted in optimizer.stats()['{rung}'], warned once)",
                RuntimeWarning,
                stacklevel=3,
            )
        self.counts[rung] += 1

    def as_dict(self) -> dict[str, int]:
        result = dict(self.counts)
        for rung, total in self.device_counts.items():
            result[rung] = result.get(rung, 0) + int(total.item())
        return result
