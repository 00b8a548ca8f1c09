"""Loss spikes: runs whose validation loss jumped well above its lowest value so far without diverging.

A run that climbs from 2.62 to 3.60 nats between two validations and never recovers still ends finite and below
:data:`precond.ablate.divergence.FACTOR` times its initial loss, so the divergence rule counts it as a result, and
its final loss enters the means and paired intervals like any other (HeavyBall's ``KLShampoo`` on seed 1 of GPT-2
small, and two of the fast KL-Shampoo's A/B runs there, did exactly this). A reader comparing optimizers wants such
instabilities named, not only averaged in. The rule, for a loss that is ≥ 0:

    spike at validation t ⇔ L_t > (1 + RISE) · min_{s<t} L_s,

with ``RISE`` = 0.1: a 10 % rise over the best validation before it. Validation on fixed batches moves by 1–2 %
between evaluations on a plateau in the shipped ablations, so 10 % is an event, not noise. The run still counts
(it is not diverged); the summary lists it with where and how far it jumped, and its final loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import attrs

from precond.ablate.divergence import diverged

RISE = 0.1
"""A validation loss more than ``RISE`` (relative) above the lowest one before it is a spike."""


@attrs.frozen
class Spike:
    """The first spike of a validation curve: at ``step``, the loss ``value`` against the lowest before it."""

    step: int
    lowest: float
    value: float

    @property
    def rise(self) -> float:
        return self.value / self.lowest - 1.0


def first_spike(steps: Sequence[int], losses: Sequence[Optional[float]]) -> Optional[Spike]:
    """The first validation of ``losses`` (at ``steps``; ``losses[0]`` the initial loss) that rose more than
    :data:`RISE` above the lowest finite loss before it, or ``None``. Non-finite losses are the divergence rule's
    and are skipped here."""
    lowest = math.inf
    for step, loss in zip(steps, losses, strict=True):
        if loss is None or not math.isfinite(loss):
            continue
        if lowest > 0 and math.isfinite(lowest) and loss > (1.0 + RISE) * lowest:
            return Spike(int(step), lowest, float(loss))
        lowest = min(lowest, loss)
    return None


def spike_of(record: Mapping[str, Any]) -> Optional[Spike]:
    """The first spike of a run record's validation curve; ``None`` for a run that diverged (the divergence rule
    reports those) or has no curve."""
    if diverged(record):
        return None
    curve = record.get("curve") or {}
    return first_spike(curve.get("step") or [], curve.get("val") or [])


def section(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """The summary's "Loss spikes" section: every run of ``records`` (variants in ``names``' order, then lr and
    seed) with a spike; an empty string when there is none."""
    order = {name: index for index, name in enumerate(names)}
    found = [(record, spike) for record in records if (spike := spike_of(record)) is not None]
    if not found:
        return ""
    found.sort(key=lambda item: (order.get(item[0]["variant"], len(order)), item[0]["lr"], item[0]["seed"]))
    lines = ["## Loss spikes", "",
             f"Runs whose validation loss rose more than {RISE:.0%} above its lowest value before it (the first such "
             f"validation). They did not diverge, so their final losses count in the tables above.", "",
             "| variant | lr | seed | step | lowest before → at the spike | rise | final val loss |",
             "|---|---|---|---|---|---|---|"]
    for record, spike in found:
        lines.append(f"| {record['variant']} | {record['lr']:g} | {record['seed']} | {spike.step} | "
                     f"{spike.lowest:.4f} → {spike.value:.4f} | +{spike.rise:.0%} | {record['final_val']:.4f} |")
    return "\n".join(lines)
