"""Loss against training time: the time axis of a run, loss at an equal time, time to a target loss.

Every run records the time of each step (``step_ms``: forward, backward, ``step()``, schedule; evaluation
excluded). The first steps carry one-time costs that a long training run does not pay again: compiling (HeavyBall
under ``torch.compile`` on CUDA compiles at its second step and again at its first preconditioner refresh, 30–50 s
in ``docs/results/gpu_long``), allocating the optimizer's state, the first preconditioner. The time axis here is
therefore the **steady** training time. The first ``W = min(ONE_TIME_STEPS, n // 4)`` of a run's ``n`` steps (at
least one) are its startup window; the mean of the later steps is the steady step time ``t̄``; each step of the
window is counted at ``t̄`` and the window's excess, ``Σ_{i<W} t_i − W t̄``, is reported apart (``startup``). Later
refreshes (every T steps), recompilations and stalls stay in: they are what a run costs, and the window holds two
refreshes of a T = 10 run, so replacing it by the mean keeps their share. A record made before step times were kept
falls back to its measured cumulative training time (``curve["seconds"]``).

- :func:`loss_at`: the validation loss of the last evaluation made by ``seconds`` (a measured value; evaluations
  are every ``eval_every`` steps, so it lags the run by less than that);
- :func:`time_to`: the time of the first evaluation at or below a target loss.

A run compared at an equal time is mid-schedule when it is slower (its learning rate has not decayed yet), so the
loss at equal time favours fast steps by design: it answers "which optimizer is ahead after this many seconds of
*this* run", while the time to a target loss is the fairer per-second comparison of full runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

Record = dict[str, Any]


ONE_TIME_STEPS = 25
"""The longest startup window: two refreshes at T = 10 and HeavyBall's two compilations (steps 2 and 11)."""


def _window(times: Sequence[float]) -> int:
    return max(1, min(ONE_TIME_STEPS, len(times) // 4))


def _steady_ms(times: Sequence[float]) -> float:
    return statistics.mean(times[_window(times):])


def startup(record: Record) -> float | None:
    """Seconds the startup window took beyond the steady step time (``None`` without step times)."""
    times = record.get("step_ms") or []
    if len(times) < 2:
        return None
    window = _window(times)
    return max(0.0, (sum(times[:window]) - window * _steady_ms(times)) / 1e3)


def ms_per_step(record: Record) -> float | None:
    """The steady step time: mean milliseconds per step after the startup window; for a record made before step
    times were kept, its training time over its steps (startup included); ``None`` when neither is known."""
    times = record.get("step_ms") or []
    if len(times) >= 2:
        return _steady_ms(times)
    if record.get("train_seconds") and record.get("steps_done"):
        return 1e3 * record["train_seconds"] / record["steps_done"]
    return None


def steady_seconds(record: Record) -> list[float]:
    """The steady training time at each evaluation of the validation curve (see the module docstring)."""
    curve = record["curve"]
    times = record.get("step_ms") or []
    if len(times) < 2:
        return [float(s) for s in curve["seconds"]]
    window = _window(times)
    steady = [_steady_ms(times)] * window + list(times[window:])
    cumulative, total = [0.0], 0.0
    for t in steady:
        total += t / 1e3
        cumulative.append(total)
    return [cumulative[min(step, len(cumulative) - 1)] for step in curve["step"]]


def loss_at(record: Record, seconds: float) -> float | None:
    """The validation loss of the last evaluation made within ``seconds`` of steady training time (the initial
    one at 0 s counts); ``None`` when that evaluation was not finite."""
    value = None
    for elapsed, val in zip(steady_seconds(record), record["curve"]["val"], strict=True):
        if elapsed > seconds + 1e-9:
            break
        value = val
    return value


def time_to(record: Record, target: float) -> float | None:
    """Steady seconds to the first evaluation at or below ``target``; ``None`` if never reached."""
    for elapsed, val in zip(steady_seconds(record), record["curve"]["val"], strict=True):
        if val is not None and val <= target:
            return elapsed
    return None


def total_seconds(record: Record) -> float:
    """Steady training time of the whole run (to its last evaluation)."""
    return steady_seconds(record)[-1]


def equal_time(runs_by_variant: Sequence[Sequence[Record]]) -> float | None:
    """The time at which every variant is compared: the shortest mean total time of a variant's runs (the
    fastest variant's whole run), so every variant has a loss at it."""
    totals = [statistics.mean(total_seconds(r) for r in runs) for runs in runs_by_variant if runs]
    return min(totals) if totals else None
