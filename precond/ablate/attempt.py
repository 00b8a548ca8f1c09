"""One run of an ablation grid, as both the serial runner and the worker processes train it: its identity
(:func:`run_key`, with the library's source hash :func:`library_fingerprint`), its log label and
:func:`attempt_run`, which trains it within the time budget and returns its record."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import precond
from precond.ablate import board, machine, progress, warnlog
from precond.ablate.config import AblationConfig
from precond.ablate.train import OutOfTime, protocol, train_run
from precond.ablate.variants import Variant
from precond.ablate.wallclock import ms_per_step

Run = tuple[Variant, float, int, str]
"""One run of the grid: variant, learning rate, seed and resume key."""

LIBRARY_PACKAGES = ("precond", "structures", "estimators", "bases")
"""The packages whose source makes up the optimizer library."""

WORKBENCH_PACKAGES = ("ablate", "bench", "tasks")
"""Subpackages of ``precond`` that are tooling, not the library: editing them keeps finished runs valid."""


def library_files(root: Path) -> Iterator[Path]:
    """Every ``.py`` file of the library under ``root`` (the directory holding the packages), subpackages such as
    ``precond/appliers`` included and the workbench's own subpackages left out, in sorted order."""
    for package in LIBRARY_PACKAGES:
        for path in sorted(root.joinpath(package).rglob("*.py")):
            inside = path.relative_to(root / package).parts
            if package == "precond" and len(inside) > 1 and inside[0] in WORKBENCH_PACKAGES:
                continue
            yield path


def fingerprint_of(root: Path) -> str:
    """A hash of the paths and contents of :func:`library_files` under ``root``."""
    digest = hashlib.sha1()
    for path in library_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def library_fingerprint() -> str:
    """The hash of this installation's library source: a run made before a change to the optimizer, its parts or
    its appliers is not reused after it; a change to the workbench alone keeps it."""
    return fingerprint_of(Path(precond.__file__).parent.parent)


def run_key(config: AblationConfig, variant: Variant, lr: float, seed: int, device: torch.device) -> str:
    """The identity of one run: the optimizer (not its label), lr, seed, the task's data and model settings,
    the training protocol, the device type and the library's source, and on the CPU the number of threads (a
    CPU run's floating-point results depend on it: reductions are split per thread). Changing any of them makes
    it a new run. A configuration's pinned ``library`` stands in for the current source's fingerprint."""
    identity = {"variant": variant.spec(), "lr": lr, "seed": seed, "task": config.task.settings(),
                "training": protocol(config.training), "device": device.type,
                "library": config.library or library_fingerprint()}
    if device.type == "cpu":
        identity["threads"] = config.threads_on(device)
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_label(index: int, total: int, run: Run) -> str:
    """How the log names the ``index``-th of ``total`` runs to train."""
    variant, lr, seed, _ = run
    return f"[{index}/{total}] {variant.name} lr={lr:g} seed={seed}"


def outcome(label: str, record: dict[str, Any]) -> str:
    """The one log line of a finished run: its final loss (or where it diverged), its time and steady step time."""
    if record["diverged"]:
        result = f"diverged ({(record.get('error') or '')[:90]})"
    elif record.get("steps_done", 0) < record.get("steps", 0):  # a timing run: the first steps only
        result = f"val {record['final_val']:.4f} at step {record['steps_done']}"
    else:
        result = f"final val {record['final_val']:.4f}"
    ms = ms_per_step(record)
    speed = "" if ms is None else f", {ms:.1f} ms/step"
    return f"{label}: {result} in {record['wall_seconds']:.0f} s{speed}"


def attempt_run(config: AblationConfig, data: Any, run: Run, label: str,
                expected: float | None, deadline: float | None, device: torch.device,
                log: Callable[[str], None], bars: bool = True, concurrent_runs: int = 1, announce: bool = True,
                stop_after: int | None = None) -> dict[str, Any] | None:
    """Train one run of the grid and return its finished record, or ``None`` when the time budget does not allow
    it (not started because ``expected`` seconds do not fit before ``deadline``, or cut off by the deadline).
    The caller sets the thread count; the record states it (``threads``), the machine's load at the start and
    the end of the run (``load``: 1-, 5- and 15-minute averages), the CPU and GPU models (``machine``), and the
    warnings the run raised, by kind (``warnings``, :mod:`precond.ablate.warnlog`). ``announce``: log the
    run's one line when it finishes (the parent does it for worker processes). ``stop_after``: a timing run of
    that many steps (:mod:`precond.ablate.timing`; not logged to TensorBoard)."""
    variant, lr, seed, key = run
    if deadline is not None and expected is not None and time.monotonic() + expected > deadline:
        log(f"{label}: not started, about {expected:.0f} s needed and "
            f"{max(0.0, deadline - time.monotonic()):.0f} s left of --max-minutes {config.max_minutes:g}")
        return None
    steps = config.training.steps if stop_after is None else min(stop_after, config.training.steps)
    inner = progress.bar(steps, label, config.progress and bars, leave=False, position=1)

    def on_eval(step: int, train: float | None, val: float, seconds: float) -> None:
        inner.set_postfix_str(f"val {val:.4f}")

    scalars = None if stop_after is not None else board.open_run(config.tensorboard, variant.name, lr, seed)
    load_before = machine.load()
    try:
        with warnlog.collect() as caught:
            record = train_run(config.task, data, variant, lr, seed, config.training, device, deadline,
                               on_eval=on_eval, on_step=inner.update, stop_after=stop_after, log_scalars=scalars)
    except OutOfTime as stop:
        log(f"{label}: stopped, {stop}; this run is not recorded and will run again next time")
        return None
    finally:
        inner.close()
        if scalars is not None:
            scalars.close()
    record.update(key=key, task=config.task.name, task_settings=config.task.settings(),
                  training=protocol(config.training), library=library_fingerprint(),
                  concurrent_runs=concurrent_runs, threads=torch.get_num_threads(),
                  load={"start": load_before, "end": machine.load()}, machine=machine.describe(device),
                  warnings=caught, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if announce:
        log(outcome(label, record))
    return record
