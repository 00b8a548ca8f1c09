"""Per-second numbers that survive a busy machine: a timing pass after the grid, and a flag on spread step times.

The grid's runs are timed as they train, several at a time (``workers``) and beside whatever else the machine
runs. On a shared 2-core machine one AdamW run took a median 35 ms per step while its two sibling runs took 17:
the per-second table then ranked AdamW behind KL-Shampoo, the opposite of the truth. Two defences:

- **The timing pass.** After the grid, each variant's best learning rate (its first seed) is run again, alone:
  one run at a time in the main process (never in worker processes), with the grid's thread count, for the
  first ``timing_steps`` steps (200 by default) under the full run's schedule, so the same steps at the same
  learning rates as the start of its grid run. Its steady step time ``t̄`` (:mod:`precond.ablate.wallclock`: the
  mean after the startup window, refreshes included in their share) and its startup extra time are the
  per-second table's; the time axis of each of the variant's best-lr runs becomes ``step × t̄``. Timing records
  are kept in ``timing.jsonl`` (keyed by the grid run and the step count) and reused like the grid's runs. A
  variant without one (``timing_steps = 0``, the time budget spent) is timed from its grid runs, and the table
  says so.
- **The spread flag.** Every record states the load average at its start and end and the CPU/GPU model
  (:mod:`precond.ablate.machine`). A variant whose grid runs' steady step times spread more than
  :data:`SPREAD_LIMIT` (slowest over fastest, runs that did not diverge) is flagged in the summary: its optimizer
  costs the same at every learning rate, so such a spread measures the machine, not the optimizer.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import attrs
import torch

from precond.ablate import machine, wallclock
from precond.ablate.attempt import Run, attempt_run
from precond.ablate.divergence import diverged
from precond.ablate.store import RunStore
from precond.ablate.summary import Record, VariantSummary
from precond.ablate.threads import thread_count

TIMING_FILE = "timing.jsonl"
SPREAD_LIMIT = 1.3
"""A variant whose grid runs' step times differ by more than this factor is flagged."""


def timing_key(run_key: str, steps: int) -> str:
    """The key of the timing run of the grid run ``run_key`` over ``steps`` steps."""
    return hashlib.sha1(f"timing:{run_key}:{steps}".encode()).hexdigest()[:16]


@attrs.frozen
class Spread:
    """The steady step times of a variant's grid runs: fastest, slowest, how many runs, and the range of the
    1-minute load averages at their starts (``None`` when not recorded)."""

    name: str
    fastest: float
    slowest: float
    runs: int
    loads: Optional[tuple[float, float]] = None

    @property
    def ratio(self) -> float:
        return self.slowest / self.fastest if self.fastest > 0 else float("inf")

    @property
    def flagged(self) -> bool:
        return self.ratio > SPREAD_LIMIT


def _start_load(record: Record) -> Optional[float]:
    start = (record.get("load") or {}).get("start")
    return start[0] if start else None


def spread(summary: VariantSummary) -> Optional[Spread]:
    """The spread of ``summary``'s grid runs that did not diverge (``None`` with fewer than two timed runs)."""
    runs = [r for r in summary.all_runs if not diverged(r)]
    times = [t for t in (wallclock.ms_per_step(r) for r in runs) if t is not None]
    if len(times) < 2:
        return None
    loads = [x for x in (_start_load(r) for r in runs) if x is not None]
    return Spread(summary.name, min(times), max(times), len(times), (min(loads), max(loads)) if loads else None)


def spreads(summaries: Iterable[VariantSummary]) -> list[Spread]:
    return [s for s in (spread(summary) for summary in summaries) if s is not None]


def timed_run(summary: VariantSummary) -> Optional[Record]:
    """The grid run the timing pass repeats for a variant: its best lr's first seed (``None`` if it diverged
    at every lr)."""
    return min(summary.best_runs, key=lambda r: r["seed"]) if summary.best_runs else None


def find(store: RunStore, summaries: Sequence[VariantSummary], steps: int) -> dict[str, Record]:
    """The timing records of ``store`` for each variant's best lr (any of its seeds) over ``steps`` steps."""
    found = {}
    for summary in summaries:
        keys = {r.get("key") for r in summary.best_runs}
        made = [r for r in store if r.get("of") in keys and r.get("timing_steps") == steps]
        if made:
            found[summary.name] = made[-1]
    return found


def run_pass(config: Any, summaries: Sequence[VariantSummary], variants: Sequence[Any], out: Path,
             device: torch.device, deadline: Optional[float], log: Callable[[str], None]) -> dict[str, Record]:
    """Time each variant's best lr alone, one run after the other in this process (see the module docstring);
    return the timing records by variant name, reused ones included. ``variants``: the plan's resolved
    variants (an ``adam_lr_from`` Muon with its ``adam_lr``)."""
    steps = min(config.timing_steps, config.training.steps)
    store = RunStore(out / TIMING_FILE)
    timings = find(store, summaries, steps)
    by_name = {variant.name: variant for variant in variants}
    todo = [(s, timed_run(s)) for s in summaries if s.name not in timings and s.name in by_name]
    todo = [(s, run) for s, run in todo if run is not None]
    if not todo:
        return timings
    log(f"timing pass: {len(todo)} best-lr run(s), one at a time in this process, {steps} steps each, so that "
        f"concurrent runs cannot bias the per-second table")
    with thread_count(config.threads_on(device)):
        data = config.task.load(device)
        for index, (summary, grid_run) in enumerate(todo, 1):
            if deadline is not None and time.monotonic() > deadline:
                log("timing pass: the time budget is spent; the remaining variants are timed from the grid's runs")
                break
            run: Run = (by_name[summary.name], grid_run["lr"], grid_run["seed"], timing_key(grid_run["key"], steps))
            label = f"[timing {index}/{len(todo)}] {summary.name} lr={grid_run['lr']:g} seed={grid_run['seed']}"
            record = attempt_run(config, data, run, label, None, deadline, device, log, stop_after=steps)
            if record is None:
                break
            record.update({"pass": "timing", "of": grid_run["key"], "timing_steps": steps, "concurrent_runs": 1})
            store.append(record)
            timings[summary.name] = record
    return timings


def uniform(record: Record, ms: float) -> Record:
    """``record`` with every step timed at ``ms`` (its time axis becomes ``step × ms``)."""
    steps = max(len(record.get("step_ms") or []), int(record.get("steps_done") or 0), 2)
    return {**record, "step_ms": [ms] * steps}


def retime(summaries: Sequence[VariantSummary], timings: dict[str, Record]) -> list[VariantSummary]:
    """The summaries with each timed variant's best-lr runs on the timing pass's clock (:func:`uniform`)."""
    timed = []
    for summary in summaries:
        ms = wallclock.ms_per_step(timings[summary.name]) if summary.name in timings else None
        if ms is None:
            timed.append(summary)
        else:
            timed.append(attrs.evolve(summary, best_runs=tuple(uniform(r, ms) for r in summary.best_runs)))
    return timed


def _load_text(loads: Optional[tuple[float, float]]) -> str:
    if loads is None:
        return "—"
    low, high = loads
    return f"{low:.2f}" if low == high else f"{low:.2f}–{high:.2f}"


def _cores(records: Iterable[Record]) -> str:
    for record in records:
        cores = (record.get("machine") or {}).get("cores")
        if cores:
            return f" on {cores} cores"
    return ""


def section(summaries: Sequence[VariantSummary], timings: dict[str, Record], config: Any,
            records: Sequence[Record]) -> str:
    """The summary's "How the times were taken" section: the method, then per variant the timing pass's step
    time and load beside the grid runs' spread, a flagged spread in bold."""
    concurrent = sorted({r.get("concurrent_runs") or 1 for r in records})
    at_once = "/".join(map(str, concurrent))
    steps = min(config.timing_steps, config.training.steps)
    window = max(1, min(wallclock.ONE_TIME_STEPS, steps // 4))
    lines = ["## How the times were taken", ""]
    if timings:
        lines.append(
            f"The per-second table and `loss_vs_time.png` are timed by a **timing pass** made after the grid: each "
            f"variant's best lr (its first seed) ran again alone, one run at a time in the main process (not in "
            f"worker processes), for its first {steps} steps under the full run's schedule. Its steady step time "
            f"(the mean of its steps after the first {window}, whose extra time is the startup column) × the steps "
            f"gives the time axis of each of the variant's best-lr runs. The grid's runs trained {at_once} at a "
            f"time: where they shared CPU cores or a GPU their own times include waiting for each other, and any "
            f"run's include other work on the machine; they are shown here only to judge the machine.")
    else:
        why = ("`timing_steps = 0`" if not config.timing_steps else
               f"none in {TIMING_FILE}: the grid is not complete, the time budget ran out, or the runs predate "
               "the timing pass")
        lines.append(
            f"No timing pass ({why}): the per-second table is timed from the grid's runs themselves, which "
            f"trained {at_once} at a time: where they shared CPU cores or a GPU their times include waiting for "
            f"each other, and any run's include other work on the machine.")
    missing = [s.name for s in summaries if s.best_runs and s.name not in timings]
    if timings and missing:
        lines.append(f"Timed from the grid's runs (no timing run): {', '.join(missing)} (marked \"grid\").")
    lines += ["", f"Load: the 1-minute load average (`os.getloadavg`){_cores(records)} at the start of each run, "
              f"recorded with every run in `runs.jsonl` (`load`, with the CPU/GPU model in `machine`). A variant is "
              f"flagged when its grid runs' steady step times spread more than {SPREAD_LIMIT:g}× (slowest over "
              f"fastest, runs that did not diverge): its optimizer costs the same at every lr, so that spread "
              f"is the machine's.", ""]
    lines += ["| variant | timing pass ms/step | load at its start | grid runs ms/step (fastest–slowest) | "
              "spread | load at the grid runs' starts |", "|---|---|---|---|---|---|"]
    flagged = []
    for summary in summaries:
        timing = timings.get(summary.name)
        ms = wallclock.ms_per_step(timing) if timing else None
        load = _start_load(timing) if timing else None
        found = spread(summary)
        if found is None:
            grid_text, ratio_text, loads = "—", "—", "—"
            one = [wallclock.ms_per_step(r) for r in summary.all_runs if not diverged(r)]
            one = [x for x in one if x is not None]
            if one:
                grid_text = f"{one[0]:.1f} (1 run)"
        else:
            grid_text = f"{found.fastest:.1f}–{found.slowest:.1f} ({found.runs} runs)"
            ratio_text = f"**{found.ratio:.2f}× FLAGGED**" if found.flagged else f"{found.ratio:.2f}×"
            loads = _load_text(found.loads)
            if found.flagged:
                flagged.append(found)
        lines.append(f"| {summary.name} | {'—' if ms is None else f'{ms:.1f}'} | "
                     f"{'—' if load is None else f'{load:.2f}'} | {grid_text} | {ratio_text} | {loads} |")
    mixed = [(summary.name, found) for summary in summaries
             if len(found := machine.instances(summary.best_runs)) > 1]
    if flagged or mixed:
        lines.append("")
    for name, boots in mixed:
        lines.append(f"- **⚠ {name}: its best-lr runs ran on {len(boots)} machine instances (boot ids "
                     f"{', '.join(boots)}): its mean step time mixes machines; compare its runs with runs of the "
                     f"same instance (`machine.boot` in `runs.jsonl`)**.")
    for found in flagged:
        source = ("the per-second table uses its timing pass" if found.name in timings
                  else "**its per-second numbers are not reliable** (no timing pass)")
        lines.append(f"- **⚠ {found.name}: step times of its grid runs spread {found.ratio:.2f}× "
                     f"({found.fastest:.1f} to {found.slowest:.1f} ms/step over {found.runs} runs; load "
                     f"{_load_text(found.loads)}): the machine was busy or the runs slowed each other**; {source}.")
    return "\n".join(lines)

