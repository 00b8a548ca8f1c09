"""The ablation's outputs: ``runs.csv`` (every run), ``summary.md`` (one row per variant) and the plots."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from precond.ablate import divergence, machine, plots, progress, spikes, timing, wallclock, warnlog
from precond.ablate.config import REFERENCE_TARGET
from precond.ablate.divergence import diverged
from precond.ablate.stats import paired_interval
from precond.ablate.summary import Record, VariantSummary, auto_target, final_loss, paired, reference_of, summarize

MIB = 2.0 ** 20
CSV_COLUMNS = ("variant", "lr", "seed", "final_val", "best_val", "diverged", "steps_done", "steps", "train_seconds",
               "wall_seconds", "optimizer_state_mib", "peak_cuda_mib", "params", "device", "spec", "key", "error")


def write_csv(records: Sequence[Record], path: Path) -> None:
    """One row per run, in grid order."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            row = dict(record)
            row["optimizer_state_mib"] = _mib(record.get("optimizer_state_bytes"))
            row["peak_cuda_mib"] = _mib(record.get("peak_cuda_bytes"))
            row["diverged"] = diverged(record)  # also a record made before the blow-up rule
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})


def _mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / MIB, 3)


def _loss_text(mean: float, std: Optional[float]) -> str:
    if not math.isfinite(mean):
        return "diverged"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _final(summary: VariantSummary) -> str:
    return _loss_text(summary.final_mean, summary.final_std)


def lr_table(summaries: Sequence[VariantSummary]) -> str:
    """Every learning rate of every variant: final validation loss, mean ± std over seeds."""
    lines = ["| variant | lr | final val loss | runs (diverged) |", "|---|---|---|---|"]
    for summary in summaries:
        for lr, mean, std, lr_diverged in summary.lr_curve:
            runs = sum(1 for r in summary.all_runs if r["lr"] == lr)
            best = " **(best)**" if lr == summary.best_lr else ""
            lines.append(f"| {summary.name} | {lr:g}{best} | {_loss_text(mean, std)} | {runs} ({lr_diverged}) |")
    return "\n".join(lines)


def _best_lr_text(summary: VariantSummary, tuning: Optional[Any]) -> str:
    if summary.best_lr is None:
        return "—"
    text = f"{summary.best_lr:g}"
    if tuning is not None and tuning.state == "limit":
        return text + " (grid edge: not bracketed)"
    if tuning is not None and tuning.state == "fixed":
        return text + " (fixed)"
    return text + (" (grid edge)" if summary.best_lr_at_edge else "")


def _difference(summary: VariantSummary, reference: Optional[VariantSummary], value: Any = final_loss) -> str:
    if reference is None or not math.isfinite(summary.final_mean):
        return "—"
    if summary.name == reference.name:
        return "reference"
    differences = paired(summary, reference, value)
    try:
        interval = paired_interval(differences)
    except ImportError:  # several seeds without scipy: the mean, and how to get the interval
        return f"{statistics.mean(differences):+.4f} (no interval: pip install scipy)"
    return "—" if interval is None else interval.text()


def markdown_table(summaries: Sequence[VariantSummary], target: Optional[float], cuda: bool,
                   reference: Optional[VariantSummary] = None, tunings: Optional[dict[str, Any]] = None) -> str:
    """The per-step table, best final validation loss first: the final loss at the best lr (mean ± std over
    seeds), its paired difference to ``reference`` with a 95% interval, steps to ``target``, memory."""
    header = ["variant", "best lr", "final val loss"]
    if reference is not None:
        header.append(f"Δ vs {reference.name} (95% CI)")
    header += ["steps to target", "optimizer state (MiB)"]
    if cuda:
        header.append("peak CUDA memory (MiB)")
    header.append("runs (diverged)")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for summary in sorted(summaries, key=lambda s: (s.final_mean, s.name)):
        steps, _, reached = summary.to_target(target) if target is not None else (None, None, 0)
        runs_at_best = len(summary.best_runs)
        if steps is not None and reached < runs_at_best:
            steps_text = f"{steps:.0f} ({reached}/{runs_at_best} seeds)"
        else:
            steps_text = "not reached" if steps is None else f"{steps:.0f}"
        state = _mib(summary.largest("optimizer_state_bytes"))
        row = [summary.name, _best_lr_text(summary, (tunings or {}).get(summary.name)), _final(summary)]
        if reference is not None:
            row.append(_difference(summary, reference))
        row += [steps_text, "—" if state is None else f"{state:.2f}"]
        if cuda:
            peak = _mib(summary.largest("peak_cuda_bytes"))
            row.append("—" if peak is None else f"{peak:.0f}")
        row.append(f"{summary.runs} ({summary.diverged})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _mean_of(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def time_table(summaries: Sequence[VariantSummary], target: Optional[float],
               reference: Optional[VariantSummary] = None,
               timings: Optional[dict[str, Record]] = None) -> tuple[str, Optional[float]]:
    """The per-second table (:mod:`precond.ablate.wallclock`) and the equal time it compares at: time per step,
    the startup window's extra time (compilation, first refreshes), the steady training time of a run, the
    validation loss reached at the equal time (mean ± std over seeds, paired difference to ``reference``) and the
    time to ``target``. With ``timings`` (:mod:`precond.ablate.timing`), a variant's step time and startup are its
    timing run's and its runs are put on that clock; a variant without one is timed from its grid runs and marked
    "grid" when others have one."""
    timings = timings or {}
    summaries = timing.retime(summaries, timings)
    reference = next((s for s in summaries if reference is not None and s.name == reference.name), None)
    healthy = [s for s in summaries if s.best_runs]
    equal = wallclock.equal_time([s.best_runs for s in healthy])
    at = f"{equal:.1f} s" if equal is not None else "—"
    header = ["variant", "ms / step", "startup extra (s)", "train time (s)", f"val loss at {at}"]
    if reference is not None:
        header.append(f"Δ vs {reference.name} at {at} (95% CI)")
    header.append("time to target (s)")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def at_equal(record: Record) -> Optional[float]:
        return None if equal is None else wallclock.loss_at(record, equal)

    rows = []
    for summary in healthy:
        runs = summary.best_runs
        losses = [at_equal(r) for r in runs]
        finite = [x for x in losses if x is not None]
        loss_text = "—" if not finite else _loss_text(statistics.mean(finite),
                                                      statistics.stdev(finite) if len(finite) > 1 else None)
        hits = [wallclock.time_to(r, target) for r in runs] if target is not None else []
        reached = [h for h in hits if h is not None]
        if not reached:
            target_text = "not reached" if target is not None else "—"
        else:
            target_text = f"{statistics.mean(reached):.1f}" + (
                f" ({len(reached)}/{len(runs)} seeds)" if len(reached) < len(runs) else "")
        timed = timings.get(summary.name)
        if timed is not None and wallclock.ms_per_step(timed) is not None:
            ms, extra, mark = wallclock.ms_per_step(timed), wallclock.startup(timed), ""
        else:
            ms = _mean_of([wallclock.ms_per_step(r) for r in runs])
            extra = _mean_of([wallclock.startup(r) for r in runs])
            mark = " (grid)" if timings else ""
        row = [summary.name, ("—" if ms is None else f"{ms:.1f}") + mark, "—" if extra is None else f"{extra:.2f}",
               f"{statistics.mean(wallclock.total_seconds(r) for r in runs):.1f}", loss_text]
        if reference is not None:
            row.append(_difference(summary, reference, at_equal) if reference.best_runs else "—")
        row.append(target_text)
        rows.append((statistics.mean(finite) if finite else math.inf, summary.name, row))
    for _, _, row in sorted(rows, key=lambda item: (item[0], item[1])):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines), equal


def target_of(setting: Union[float, str, None], summaries: Sequence[VariantSummary],
              reference: Optional[VariantSummary]) -> Optional[float]:
    """The loss of "steps/time to target": a number as given; ``None`` (auto) the weakest variant's best final
    loss; ``"reference"`` the reference's mean final loss (``None`` while it has no finished run)."""
    if setting is None:
        return auto_target(summaries)
    if setting == REFERENCE_TARGET:
        return reference.final_mean if reference is not None and math.isfinite(reference.final_mean) else None
    return float(setting)


def _preamble(config: Any, device: torch.device, records: Sequence[Record], target: Optional[float],
              setting: Union[float, str, None]) -> str:
    training = config.training
    settings = {k: v for k, v in config.task.settings().items() if k != "task"}
    params = records[0].get("params") if records else None
    threads = sorted({r["threads"] for r in records if r.get("threads") is not None})
    machines = sorted({_machine_text(r["machine"]) for r in records if r.get("machine")})
    plural = "s" if threads != [1] else ""
    threads_text = f" ({'/'.join(map(str, threads))} CPU thread{plural} per run)" if threads else ""
    how = {None: " (auto: the weakest non-diverged variant's best final loss)",
           REFERENCE_TARGET: " (the reference's mean final loss: who reaches it first)"}
    target_text = "—" if target is None else f"{target:.4f}" + (how[setting] if setting in how else "")
    memory = ("optimizer state = bytes of every tensor in optimizer.state; peak CUDA memory = "
              "torch.cuda.max_memory_allocated during the run" if device.type == "cuda" else
              "optimizer state = bytes of every tensor in optimizer.state (CPU run: no allocator peak)")
    return "\n".join([
        f"# Ablation on {config.task.name}",
        "",
        f"- task: {config.task.name} ({', '.join(f'{k}={v}' for k, v in settings.items())})"
        + (f", {params:,} parameters" if params else ""),
        f"- device: {device}{threads_text} · {training.steps} steps · {training.schedule} schedule, "
        f"warmup {training.warmup:g} · "
        f"validation on {training.eval_batches} batches every {training.eval_every} steps · "
        f"seeds {', '.join(map(str, config.seeds))}",
        *([f"- learning rates tuned on seed(s) {', '.join(map(str, config.tuning_seeds))} alone (`tuning_seeds`): "
           f"the best lr is theirs, and the other seeds run at each variant's best lr only"]
          if config.tuning_seeds is not None else []),
        f"- final val loss: mean (± std) over seeds at the best learning rate of the variant's grid; "
        f"target val loss {target_text}; times are training time without evaluation; a run diverged when a "
        f"validation loss was not finite or above {divergence.FACTOR:g}× the initial one; a run spiked (listed, still "
        f"counted) when a validation loss rose more than {spikes.RISE:.0%} above the lowest before it",
        f"- memory: {memory}",
        *([f"- machine: {'; '.join(machines)}"] if machines else []),
        *([f"- **machine instances: {len(boots)}** (boot ids {', '.join(boots)}): runs of different instances "
           f"are not timed on the same machine; compare per-second numbers within one (`machine.boot` in "
           f"`runs.jsonl`)"] if len(boots := machine.instances(records)) > 1 else []),
        *[f"- **skipped: {variant.name}**: {reason}; its runs were not made" for variant, reason in config.skipped()],
        "",
    ])


def _machine_text(machine: dict[str, Any]) -> str:
    cores = f", {machine['cores']} cores" if machine.get("cores") else ""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ""
    return f"CPU {machine.get('cpu') or 'unknown'}{cores}{gpu}"


def variants_section(config: Any) -> str:
    """Why each variant is in the ablation (its ``why``), and which are expected to diverge."""
    lines = ["## The variants", ""]
    for variant in config.variants:
        note = " — *expected to diverge*" if variant.expected_to_diverge else ""
        why = f": {variant.why}" if variant.why else ""
        lines.append(f"- **{variant.name}** (`{variant.spec()}`){note}{why}")
    return "\n".join(lines)


def _tuning_section(tunings: dict[str, Any], extend_lrs: int) -> str:
    """One line per variant: is its best learning rate strictly inside its grid (:mod:`precond.ablate.bracket`)?"""
    rule = (f"Each grid is extended by one lr beyond an edge holding the best lr (at most {extend_lrs} added per "
            f"variant, `extend_lrs`) until the best lr has a smaller and a larger neighbour." if extend_lrs else
            "The grids are kept as given (`extend_lrs = 0`): a best lr at an edge is reported, not extended.")
    lines = ["## Tuning: is each best learning rate inside its grid?", "", rule, ""]
    for name, tuning in tunings.items():
        text = f"{name}: {tuning.message}"
        lines.append(f"- **{text}**" if tuning.state in ("limit", "pending", "waiting", "unexpected") else f"- {text}")
    return "\n".join(lines)


def _reference_note(reference: Optional[VariantSummary], baselines: Sequence[str]) -> str:
    if reference is None:
        return ""
    chosen = (f"the best of the baselines ({', '.join(baselines)})" if reference.name in baselines
              else "the best variant (no baseline finished)")
    return (f"- Δ: a variant's loss minus {reference.name}'s ({chosen}), paired seed by seed at each one's best lr; "
            f"mean and 95% Student-t interval over the seeds; **not significant** when the interval contains 0, "
            f"\"better\"/\"worse\" when it lies below/above 0\n")


def write_reports(records: Sequence[Record], config: Any, device: torch.device, out: Path,
                  tunings: Optional[dict[str, Any]] = None,
                  timings: Optional[dict[str, Record]] = None) -> tuple[dict[str, Path], str]:
    """Write ``runs.csv``, ``summary.md`` and (with matplotlib) ``loss_curves.png``, ``loss_vs_time.png`` and
    ``lr_sweep.png`` into ``out``; return the paths and the per-step Markdown table. ``tunings``: each variant's
    :class:`precond.ablate.bracket.Tuning` (a section of the summary says whether each best lr is inside);
    ``timings``: each variant's timing run (:mod:`precond.ablate.timing`), which times the per-second table. The
    warnings the runs raised are listed by kind (:mod:`precond.ablate.warnlog`)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"runs": out / "runs.jsonl", "csv": out / "runs.csv", "markdown": out / "summary.md"}
    write_csv(records, files["csv"])
    summaries = summarize(records, [variant.name for variant in config.variants], config.tuning_seeds)
    baselines = config.baseline_names()
    reference = reference_of(summaries, baselines)
    target = target_of(config.target_loss, summaries, reference)
    timings = timings or {}
    if timings:
        files["timing"] = out / timing.TIMING_FILE
    digest = warnlog.Digest()
    digest.add_all(records)
    table = markdown_table(summaries, target, device.type == "cuda", reference, tunings)
    seconds, equal = time_table(summaries, target, reference, timings)
    sections = [_preamble(config, device, records, target, config.target_loss) + _reference_note(
        reference, baselines), variants_section(config)]
    if tunings:
        sections.append(_tuning_section(tunings, config.extend_lrs))
    sections.append("## Per step\n\n" + table)
    if spiked := spikes.section(records, [variant.name for variant in config.variants]):
        sections.append(spiked)
    clock = ("each variant's timing run (see \"How the times were taken\")" if timings else
             "each run's own step times")
    sections.append("## Per second\n\n"
                    + (f"Steady training time, timed by {clock}: the first min(25, steps/4) steps, where "
                       f"compilation and first refreshes fall, are counted at the steady mean step time, their extra "
                       f"time in its own column; the loss at {equal:.1f} s, the fastest variant's whole run, is "
                       f"that of the last validation made by then (slower variants are mid-schedule there).\n\n"
                       if equal is not None else "") + seconds)
    sections.append(timing.section(summaries, timings, config, records))
    sections.append("## Every learning rate\n\n" + lr_table(summaries))
    if digest.markdown():
        sections.append(digest.markdown())
    files["markdown"].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    try:
        files.update(plots.write_plots(timing.retime(summaries, timings), out,
                                       title=f"{config.task.name} on {device}", equal_time=equal, target=target))
    except ImportError:
        progress.log("matplotlib is not installed: no plots (pip install -e '.[demo]')")
    return files, table
