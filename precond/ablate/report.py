"""The ablation's outputs: ``runs.csv`` (every run), ``summary.md`` (one row per variant) and the plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from precond.ablate import divergence, plots, progress
from precond.ablate.divergence import diverged
from precond.ablate.summary import Record, VariantSummary, auto_target, summarize

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
        for lr, mean, std, diverged in summary.lr_curve:
            runs = sum(1 for r in summary.all_runs if r["lr"] == lr)
            best = " **(best)**" if lr == summary.best_lr else ""
            lines.append(f"| {summary.name} | {lr:g}{best} | {_loss_text(mean, std)} | {runs} ({diverged}) |")
    return "\n".join(lines)


def markdown_table(summaries: Sequence[VariantSummary], target: Optional[float], cuda: bool) -> str:
    """The per-variant table, best final validation loss first."""
    header = ["variant", "best lr", "final val loss", "steps to target", "time to target (s)", "time per run (s)",
              "optimizer state (MiB)"]
    if cuda:
        header.append("peak CUDA memory (MiB)")
    header.append("runs (diverged)")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for summary in sorted(summaries, key=lambda s: (s.final_mean, s.name)):
        steps, seconds, reached = summary.to_target(target) if target is not None else (None, None, 0)
        runs_at_best = len(summary.best_runs)
        if steps is not None and reached < runs_at_best:
            steps_text, seconds_text = f"{steps:.0f} ({reached}/{runs_at_best} seeds)", f"{seconds:.1f}"
        else:
            steps_text = "not reached" if steps is None else f"{steps:.0f}"
            seconds_text = "—" if seconds is None else f"{seconds:.1f}"
        state = _mib(summary.largest("optimizer_state_bytes"))
        best_lr = "—" if summary.best_lr is None else f"{summary.best_lr:g}" + (
            " (grid edge)" if summary.best_lr_at_edge else "")
        row = [summary.name, best_lr, _final(summary), steps_text,
               seconds_text, "—" if summary.mean_of("wall_seconds") is None else f"{summary.mean_of('wall_seconds'):.1f}",
               "—" if state is None else f"{state:.2f}"]
        if cuda:
            peak = _mib(summary.largest("peak_cuda_bytes"))
            row.append("—" if peak is None else f"{peak:.0f}")
        row.append(f"{summary.runs} ({summary.diverged})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _preamble(config: Any, device: torch.device, records: Sequence[Record], target: Optional[float],
              automatic: bool) -> str:
    training = config.training
    settings = {k: v for k, v in config.task.settings().items() if k != "task"}
    params = records[0].get("params") if records else None
    threads = sorted({r["threads"] for r in records if r.get("threads") is not None})
    plural = "s" if threads != [1] else ""
    threads_text = f" ({'/'.join(map(str, threads))} CPU thread{plural} per run)" if threads else ""
    target_text = "—" if target is None else f"{target:.4f}" + (
        " (auto: the weakest non-diverged variant's best final loss)" if automatic else "")
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
        f"- final val loss: mean (± std) over seeds at the best learning rate of the variant's grid; "
        f"target val loss {target_text}; times are training time without evaluation; a run diverged when a "
        f"validation loss was not finite or above {divergence.FACTOR:g}× the initial one",
        f"- memory: {memory}",
        *[f"- **skipped: {variant.name}**: {reason}; its runs were not made" for variant, reason in config.skipped()],
        "",
        "",
    ])


def write_reports(records: Sequence[Record], config: Any, device: torch.device, out: Path) -> tuple[dict[str, Path], str]:
    """Write ``runs.csv``, ``summary.md`` and (with matplotlib) ``loss_curves.png`` and ``lr_sweep.png`` into
    ``out``; return the paths and the Markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"runs": out / "runs.jsonl", "csv": out / "runs.csv", "markdown": out / "summary.md"}
    write_csv(records, files["csv"])
    summaries = summarize(records, [variant.name for variant in config.variants])
    target = config.target_loss if config.target_loss is not None else auto_target(summaries)
    table = markdown_table(summaries, target, device.type == "cuda")
    by_lr = "## Every learning rate\n\n" + lr_table(summaries)
    files["markdown"].write_text(_preamble(config, device, records, target, config.target_loss is None) + table
                                 + "\n\n" + by_lr + "\n", encoding="utf-8")
    try:
        files.update(plots.write_plots(summaries, out, title=f"{config.task.name} on {device}"))
    except ImportError:
        progress.log("matplotlib is not installed: no plots (pip install -e '.[demo]')")
    return files, table
