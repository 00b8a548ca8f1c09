"""Learning-rate schedules as ``LambdaLR`` multipliers: linear warmup, then cosine decay or constant."""

from __future__ import annotations

import math
from typing import Callable


def multiplier(steps: int, schedule: str = "cosine", warmup: float = 0.05,
               min_ratio: float = 0.1) -> Callable[[int], float]:
    """``f(t)``, the factor on the base learning rate before update ``t + 1`` (``t`` = 0, 1, …, ``steps − 1``).

    Linear warmup over the first ``round(warmup · steps)`` updates, then ``"cosine"`` decay to ``min_ratio`` at
    the last update or ``"constant"``.
    """
    warmup_steps = int(round(warmup * steps))

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (t - warmup_steps) / max(1, steps - 1 - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
