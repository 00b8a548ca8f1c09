"""Learning-rate schedules as ``LambdaLR`` multipliers: linear warmup, then cosine or linear decay, or constant.

The same multiplier scales every param group of every variant (``LambdaLR`` writes ``group["lr"]`` before each
step), the peers' included: each of them reads ``group["lr"]`` at every step.
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("cosine", "linear", "constant")


def multiplier(steps: int, schedule: str = "cosine", warmup: float = 0.05,
               min_ratio: float = 0.1) -> Callable[[int], float]:
    """``f(t)``, the factor on the base learning rate before update ``t + 1`` (``t`` = 0, 1, …, ``steps − 1``).

    Linear warmup over the first ``w = round(warmup · steps)`` updates (``f(t) = (t + 1)/w``), then, with
    ``u = (t − w)/(steps − 1 − w)`` the progress of the decay from 0 to 1:

    - ``"cosine"``: ``f = r + (1 − r)·½(1 + cos πu)``, from 1 down to ``r = min_ratio`` at the last update;
    - ``"linear"``: ``f = 1 − (1 − r)·u``, the same end points on a straight line;
    - ``"constant"``: ``f = 1``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    warmup_steps = int(round(warmup * steps))

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (t - warmup_steps) / max(1, steps - 1 - warmup_steps))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
