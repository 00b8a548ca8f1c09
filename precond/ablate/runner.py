"""Run an ablation grid: skip finished runs, train the rest within the time budget, then write the reports."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import torch

from precond.ablate import board, bracket, progress, timing, warnlog
from precond.ablate.attempt import attempt_run, library_fingerprint, outcome, run_key, run_label
from precond.ablate.config import AblationConfig, resolve_device
from precond.ablate.parallel import run_in_processes
from precond.ablate.report import write_reports
from precond.ablate.store import RunStore
from precond.ablate.summary import summarize
from precond.ablate.threads import thread_count
from precond.ablate.train import protocol

RUNS_FILE = "runs.jsonl"


@attrs.frozen
class AblationResult:
    """What :func:`run_ablation` did: runs trained now, found finished, left undone (time budget), and the files."""

    executed: int
    skipped: int
    remaining: int
    records: tuple[dict[str, Any], ...]
    files: dict[str, Path]
    table: str


def _expected_seconds(store: RunStore, spec: str, durations: list[float]) -> Optional[float]:
    """A guess of one run's duration: the longest finished run of the same variant, else of any variant so far."""
    same = store.longest(spec)
    if same is not None:
        return same
    return max(durations) if durations else None


def run_ablation(
    config: AblationConfig, log: Callable[[str], None] = progress.log, train: bool = True
) -> AblationResult:
    """Train every run of the grid not already in ``<out>/runs.jsonl``, extend each variant's grid until its best
    learning rate lies inside it (:mod:`precond.ablate.bracket`; ``extend_lrs`` per variant at most) and train
    those runs too, then write the CSV, the Markdown summary and the plots from all finished runs of the grid.
    With ``max_minutes``, a run that is not expected to finish in the time left is not started, and one still going
    when the time is up is dropped. With ``workers`` > 1 the runs train in that many processes at once on the same
    device (see :mod:`precond.ablate.parallel`); their records say so in ``concurrent_runs``, because their times
    then include waiting for each other. On the CPU each run uses ``config.threads_on(device)`` threads (1 unless
    set), restored afterwards. A variant whose library is missing is skipped and named in the summary. Once the
    grid is complete, a timing pass (:mod:`precond.ablate.timing`, ``timing_steps``) runs each variant's best lr
    alone, one at a time in this process, and times the per-second table, so concurrent runs cannot bias it.
    The log has one line per finished run (and a progress bar on a terminal); a warning is logged once per kind
    (:mod:`precond.ablate.warnlog`) and the summary lists them all.
    ``train=False`` only writes the reports of the runs already finished (the device need not be present, so a
    GPU grid can be reported on a laptop)."""
    started = time.monotonic()
    deadline = started + 60.0 * config.max_minutes if config.max_minutes is not None else None
    device = resolve_device(config.device, usable=train)
    out = Path(config.out)
    store = RunStore(out / RUNS_FILE)
    if not train:
        return _report_only(config, device, store, log)
    _prepare(config, log)

    def lookup(variant: Any, lr: float, seed: int) -> Optional[dict[str, Any]]:
        return store.get(run_key(config, variant, lr, seed, device))

    digest = warnlog.Digest()
    executed, round_ = 0, 0
    while True:
        plan = bracket.plan(config, lookup)
        grid = [(variant, lr, seed, run_key(config, variant, lr, seed, device)) for variant, lr, seed in plan.grid()]
        todo = [run for run in grid if run[3] not in store]
        if not todo:
            break
        round_ += 1
        if round_ == 1:
            waiting = sum(t.state == "waiting" for t in plan.tunings.values())
            log(f"ablation: {len(grid)} runs ({len(plan.variants)} variants"
                + (f"; {waiting} more wait for another variant's best lr" if waiting else "")
                + f") on task {config.task.name} on {device}; "
                f"{len(grid) - len(todo)} already finished in {out / RUNS_FILE}, {len(todo)} to run"
                + (f" in {min(config.workers, len(todo))} processes" if min(config.workers, len(todo)) > 1 else ""))
        else:
            log(f"ablation: {len(todo)} more run(s) to bracket best learning rates or run at another variant's: "
                + "; ".join(f"{t.name} {t.message}" for t in plan.tunings.values() if t.state == "pending"))
        trained = _train(config, todo, store, deadline, device, log, digest)
        executed += trained
        if trained < len(todo):  # the time budget is spent
            break

    plan = bracket.plan(config, lookup)
    for tuning in plan.tunings.values():
        if tuning.state in ("limit", "unexpected"):
            log(f"ablation: {tuning.name}: {tuning.message}")
    grid = [run_key(config, variant, lr, seed, device) for variant, lr, seed in plan.grid()]
    remaining = sum(key not in store for key in grid)
    records = tuple(store.get(key) for key in
                    (run_key(config, variant, lr, seed, device) for variant, lr, seed in plan.grid(every_lr=True))
                    if key in store)
    timings = _timing_pass(config, records, plan, remaining, device, deadline, log)
    if digest.total():
        log(f"warnings: {digest.total()} during the runs trained now, of {len(digest.kinds)} kind(s), each shown once "
            f"above; summary.md lists them")
    files, table = write_reports(records, config, device, out, plan.tunings, timings)
    log(f"ablation: {executed} run(s) trained now, {len(records) - executed} reused, {remaining} left; "
        f"{time.monotonic() - started:.0f} s; reports in {out}/")
    return AblationResult(executed, len(records) - executed, remaining, records, files, table)


def _prepare(config: AblationConfig, log: Callable[[str], None]) -> None:
    """Before training: a missing tensorboard raises now (not after the first run); skipped variants and a pinned
    library fingerprint are logged."""
    if config.tensorboard is not None:
        board.writer_class()
    for variant, reason in config.skipped():
        log(f"ablation: skipping {variant.name}: {reason}")
    if config.library is not None and config.library != library_fingerprint():
        log(f"ablation: runs keyed by the pinned library fingerprint {config.library}; this source's is "
            f"{library_fingerprint()} (each new record states the one that trained it)")


def _timing_pass(config: AblationConfig, records: tuple[dict[str, Any], ...], plan: bracket.Plan, remaining: int,
                 device: torch.device, deadline: Optional[float],
                 log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The timing runs of the complete grid's best lrs (:func:`precond.ablate.timing.run_pass`); none while the
    grid is incomplete or with ``timing_steps = 0``."""
    if not config.timing_steps:
        return {}
    if remaining:
        log("timing pass: not yet, the grid is not complete (the per-second table is timed from the grid's runs)")
        return {}
    summaries = summarize(records, [variant.name for variant in config.variants], config.tuning_seeds)
    return timing.run_pass(config, summaries, plan.variants, Path(config.out), device, deadline, log)


def _train(config: AblationConfig, todo: list[Any], store: RunStore, deadline: Optional[float], device: torch.device,
           log: Callable[[str], None], digest: warnlog.Digest) -> int:
    """Train ``todo`` (serially or in worker processes), storing each record as it finishes and logging one line
    per run (and a warning of a kind no run raised before, once); the number trained (fewer than ``len(todo)``
    when the time budget ran out)."""
    executed = 0
    workers = min(config.workers, len(todo))
    outer = progress.bar(len(todo), "runs", config.progress, position=0)

    def finished(label: str, record: dict[str, Any]) -> None:
        store.append(record)
        for line in digest.add(record, label):
            log(line)
        outer.update()

    try:
        if workers > 1:
            for label, record in run_in_processes(config, todo, store, deadline, device, workers, log):
                log(outcome(label, record))
                finished(label, record)
                executed += 1
            return executed
        with thread_count(config.threads_on(device)):
            data = config.task.load(device)
            durations: list[float] = []
            for index, run in enumerate(todo, 1):
                label = run_label(index, len(todo), run)
                record = attempt_run(config, data, run, label, _expected_seconds(store, run[0].spec(), durations),
                                     deadline, device, log)
                if record is None:
                    break
                finished(label, record)
                executed += 1
                durations.append(record["wall_seconds"])
        return executed
    finally:
        outer.close()


def _report_only(config: AblationConfig, device: torch.device, store: RunStore,
                 log: Callable[[str], None]) -> AblationResult:
    """Reports of the grid's finished runs, matched by what the configuration says (variant, lr, seed, training
    protocol, task options, device type) rather than by resume key: the key also holds the corpus' and the
    library's fingerprints, which differ on another machine (another Python's standard library). A mismatch of
    either is said in the log, and the runs are reported as they were made."""
    settings = config.task.settings()
    training = json.loads(json.dumps(protocol(config.training)))
    latest = {}
    for record in store:
        same_setup = (record.get("training") == training and record.get("device", "").split(":")[0] == device.type
                      and _without_text(record.get("task_settings") or {}) == _without_text(settings))
        if same_setup:
            latest[(record.get("spec"), record.get("lr"), record.get("seed"))] = record
    plan = bracket.plan(config, lambda variant, lr, seed: latest.get((variant.spec(), lr, seed)))
    grid = [(v.spec(), lr, seed) for v, lr, seed in plan.grid()]
    records = tuple(latest[item] for item in ((v.spec(), lr, seed) for v, lr, seed in plan.grid(every_lr=True))
                    if item in latest)
    timings = timing.find(RunStore(Path(config.out) / timing.TIMING_FILE),
                          summarize(records, [variant.name for variant in config.variants], config.tuning_seeds),
                          min(config.timing_steps, config.training.steps))
    library = library_fingerprint()
    if any(r.get("task_settings", {}).get("text") != settings.get("text") for r in records):
        log("note: some runs were made on a different corpus than this machine's (e.g. another Python's standard "
            "library); they are reported as they were made")
    if any(r.get("library") != library for r in records):
        log("note: some runs were made with a different version of the library's source; reported as made")
    files, table = write_reports(records, config, device, Path(config.out), plan.tunings, timings)
    remaining = sum(item not in latest for item in grid)
    log(f"ablation: reported {len(records)} finished run(s), {remaining} of the grid not found in "
        f"{Path(config.out) / RUNS_FILE}; reports in {config.out}/")
    return AblationResult(0, len(records), remaining, records, files, table)


def _without_text(settings: dict[str, Any]) -> dict[str, Any]:
    """Task settings less the corpus fingerprint (``text``), which depends on the machine's Python."""
    return {key: value for key, value in settings.items() if key != "text"}
