"""When a run counts as diverged: a validation loss that is not finite, or that rose far above where it started.

A loss that climbs from 5.6 (chance level for bytes, ln 256 ≈ 5.55) to 6232 is as useless as a NaN, but is a
finite number: counted as a result, it became the demo's automatic target loss (every variant "reached" it at
step 0) and stretched the plots' axes so that the working variants were flat lines. The rule, for a loss that
is ≥ 0 (cross entropy, squared error), is

    diverged ⇔ some validation loss L_t is NaN/±inf, or L_t > FACTOR · L_0,

with ``L_0`` the loss of the initial weights and ``FACTOR`` = 2: twice the loss of an untrained model is worse
than not training at all, and no working optimizer in the shipped ablations comes near it (their losses fall
from the start). Training stops at the first such evaluation; records written before this rule existed are
judged by it when read (:func:`diverged`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

FACTOR = 2.0
"""A validation loss above ``FACTOR`` times the initial one counts as diverged."""


def blown_up(loss: float | None, initial: float | None) -> str | None:
    """Why ``loss`` counts as diverged given the initial loss ``initial`` (``None`` = not recorded because not
    finite), or ``None`` when it does not."""
    if loss is None or not math.isfinite(loss):
        return f"validation loss is {loss}"
    if initial is not None and math.isfinite(initial) and initial > 0 and loss > FACTOR * initial:
        return f"validation loss {loss:.4g} is above {FACTOR:g}× the initial {initial:.4g}"
    return None


def first_blow_up(losses: Sequence[float | None]) -> tuple[int, str] | None:
    """The index of the first loss of a validation curve (``losses[0]`` the initial one) that counts as
    diverged, with the reason; ``None`` when the whole curve is sound."""
    initial = losses[0] if losses else None
    for index, loss in enumerate(losses):
        reason = blown_up(loss, initial)
        if reason is not None:
            return index, reason
    return None


def diverged(record: Mapping[str, Any]) -> bool:
    """Whether a run record diverged: flagged at training time, without a final loss, or with a validation
    curve that blows up by the rule above (records made before the rule)."""
    if record.get("diverged") or record.get("final_val") is None:
        return True
    curve = record.get("curve") or {}
    return first_blow_up(curve.get("val") or []) is not None
