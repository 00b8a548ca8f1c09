"""The check every step starts with: the largest ``|g|`` of each gradient (and each tensor ``lr``), read with one
host synchronisation before anything is touched, and what follows from it.

- A NaN/Inf gradient or ``lr`` (or a negative tensor ``lr``): ``on_nonfinite="raise"`` raises
  ``FloatingPointError``; ``"skip"`` skips the step (counted in ``stats()["nonfinite_skipped"]``, warned once).
- A finite gradient whose largest entry exceeds :data:`GRADIENT_BOUND` (``2⁴⁰`` ≈ 1.1e12, far beyond healthy
  training, where float32 grams start to risk overflow) is multiplied by a power of two (exact) down to that bound
  before momentum and statistics see it, counted in ``stats()["gradient_rescaled"]``: gradients up to float32's
  range leave the parameters finite.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from precond.fallbacks import FallbackCounter

GRADIENT_BOUND = 2.0**40

Work = list[tuple[dict[str, Any], torch.Tensor, Optional[torch.Tensor]]]


def largest_entries(grads: Sequence[torch.Tensor], lrs: Sequence[torch.Tensor]) -> list[float]:
    """``max |g|`` of every gradient, then the value of every tensor ``lr``: one host synchronisation."""
    maxima = torch._foreach_norm(list(grads), float("inf"))
    device = maxima[0].device
    return torch.stack([m.to(device=device, dtype=torch.float64) for m in maxima]
                       + [lr.detach().reshape(()).to(device=device, dtype=torch.float64) for lr in lrs]).tolist()


def verdict(work: Work, values: list[float], on_nonfinite: str, name: Callable[[torch.Tensor], str],
            counter: FallbackCounter) -> Optional[Work]:
    """The decision from ``values`` (the largest ``|g|`` of each ``(group, p, grad)`` of ``work``, then each tensor
    ``lr``): raise, skip (None), or the work with huge gradients scaled down. Entries whose gradient is None (another
    rank's, in a distributed run) are judged but not returned."""
    bad = [name(p) for (_, p, _), m in zip(work, values[:len(work)], strict=True) if not math.isfinite(m)]
    bad += [f"lr of group {i}" for i, lr in enumerate(values[len(work):]) if not math.isfinite(lr) or lr < 0]
    if bad:
        if on_nonfinite == "skip":
            counter.count("nonfinite_skipped", f"a step with a non-finite gradient or lr ({', '.join(bad)}) "
                          "was skipped; nothing was changed")
            return None
        raise FloatingPointError(
            f"non-finite gradient (NaN or Inf) or lr in {', '.join(bad)}; the step was refused and no "
            "optimizer state was changed. Lower the learning rate, clip gradients, skip this batch, or build the "
            "optimizer with on_nonfinite='skip'.")
    out = []
    for (group, p, grad), largest in zip(work, values[:len(work)], strict=True):
        if grad is None:
            continue
        if largest > GRADIENT_BOUND:
            counter.count("gradient_rescaled", f"a gradient of magnitude {largest:.3g} ({name(p)}) "
                          f"was scaled down by a power of two to {GRADIENT_BOUND:.3g}")
            grad = grad * 2.0 ** (math.frexp(GRADIENT_BOUND)[1] - math.frexp(largest)[1])
        out.append((group, p, grad))
    return out
