"""The three figures of an ablation (matplotlib, Agg backend: no display needed).

- ``loss_curves.png``: validation loss of each variant's best run against steps and against steady training
  time. A variant that diverged at every learning rate is drawn dashed (its longest run) up to where it leaves the
  axes, ending in ``×`` at the top edge; the axes are scaled to the runs that did not diverge, so a blow-up to
  thousands no longer flattens them. The y-axis is logarithmic when those losses span a factor of
  :data:`LOG_RATIO` or more (an LM falling from 5.5 to 1.3).
- ``lr_sweep.png``: final validation loss against learning rate (log x), mean ± std over seeds; a learning
  rate at which a run diverged is marked ``×`` at the top edge of the axes.
- ``loss_vs_time.png``: validation loss against steady training time (:mod:`precond.ablate.wallclock`, on the
  timing pass's clock where there is one, :mod:`precond.ablate.timing`), the mean over the seeds at each
  variant's best lr (each seed drawn faintly), with the equal time of the per-second table and the target loss
  as dotted lines, both in the legend; a variant that diverged at every lr is named in a note, not drawn.

The lr axis of ``lr_sweep.png`` spans the learning rates of the variants that did not diverge at every lr; a
variant that did (far below the others, as ungrafted Shampoo) is named in a note in the corner instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from precond.ablate import wallclock
from precond.ablate.summary import Record, VariantSummary

LOG_RATIO = 3.0
"""A y-axis whose values span this factor or more is drawn on a log scale."""

Point = tuple[float, float, float]
"""``(step, training seconds, validation loss)``."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, panels: Sequence[Any], path: Path, legend: bool) -> None:
    """Grid every panel (and give it a legend if asked and it has labels), lay out, write ``path``, close."""
    for axes in panels:
        axes.grid(alpha=0.3, which="both")
        if legend and axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _color(index: int) -> str:
    """The same colour for a variant in both figures (matplotlib's default cycle)."""
    return f"C{index % 10}"


def _log_y(axes: Any) -> None:
    """A log y-axis labelled with plain numbers (2, 3, 4 rather than 2×10⁰)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)))
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(NullFormatter())


def shown_run(summary: VariantSummary) -> tuple[Record | None, bool]:
    """The run drawn for a variant and whether it diverged: the best run, or, when every run diverged, the one
    that lasted longest (its blow-up is what there is to see)."""
    best = summary.best_run()
    if best is not None:
        return best, False
    if not summary.all_runs:
        return None, True
    return max(summary.all_runs, key=lambda r: (r.get("steps_done") or 0, -r["lr"])), True


def points(run: Record) -> list[tuple[float, float, float | None]]:
    """``(step, steady seconds, val)`` of every evaluation (``val`` ``None`` where it was not finite; the time
    axis of :mod:`precond.ablate.wallclock`, the timing pass's clock for a retimed run)."""
    curve = run["curve"]
    return list(zip(curve["step"], wallclock.steady_seconds(run), curve["val"], strict=True))


def seeds_text(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def axis_range(values: Sequence[float]) -> tuple[float, float, bool]:
    """``(bottom, top, log)`` of a y-axis showing ``values`` (positive losses) with a margin; ``log`` when they
    span :data:`LOG_RATIO` or more."""
    low, high = min(values), max(values)
    log = low > 0 and high / low >= LOG_RATIO
    if log:
        return low / 1.1, high * 1.15, True
    margin = 0.08 * (high - low) + 1e-3
    return low - margin, high + margin, False


def clip_at(curve: Sequence[tuple[float, float, float | None]], top: float) -> tuple[list[Point], bool]:
    """The points of ``curve`` up to where it first leaves the axes (a loss above ``top`` or not finite), that
    point drawn at ``top``; and whether it was cut there."""
    kept: list[Point] = []
    for step, seconds, val in curve:
        if val is None or not math.isfinite(val) or val > top:
            kept.append((step, seconds, top))
            return kept, True
        kept.append((step, seconds, val))
    return kept, False


def write_plots(summaries: Sequence[VariantSummary], out: Path, title: str = "", equal_time: float | None = None,
                target: float | None = None) -> dict[str, Path]:
    """Write the three figures into ``out``; raises ``ImportError`` without matplotlib."""
    plt = _pyplot()
    files = {"curves": out / "loss_curves.png", "lr_sweep": out / "lr_sweep.png", "time": out / "loss_vs_time.png"}
    _curves(plt, summaries, files["curves"], title)
    _sweep(plt, summaries, files["lr_sweep"], title)
    _against_time(plt, summaries, files["time"], title, equal_time, target)
    return files


def mean_curve(runs: Sequence[Record]) -> list[tuple[float, float]]:
    """``(mean steady seconds, mean validation loss)`` over ``runs`` at each evaluation they all made with a
    finite loss."""
    curves = [list(zip(wallclock.steady_seconds(r), r["curve"]["val"], strict=True)) for r in runs]
    length = min((len(c) for c in curves), default=0)
    points = []
    for index in range(length):
        column = [c[index] for c in curves]
        if all(val is not None and math.isfinite(val) for _, val in column):
            points.append((sum(t for t, _ in column) / len(column), sum(v for _, v in column) / len(column)))
    return points


def _against_time(plt: Any, summaries: Sequence[VariantSummary], path: Path, title: str,
                  equal_time: float | None, target: float | None) -> None:
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    drawn = []
    for index, summary in enumerate(summaries):
        if not summary.best_runs:
            continue
        for run in summary.best_runs:
            seconds = wallclock.steady_seconds(run)
            pairs = [(t, v) for t, v in zip(seconds, run["curve"]["val"], strict=True) if v is not None]
            axes.plot([t for t, _ in pairs], [v for _, v in pairs], color=_color(index), alpha=0.25, linewidth=0.8)
        curve = mean_curve(summary.best_runs)
        drawn += [v for _, v in curve]
        axes.plot([t for t, _ in curve], [v for _, v in curve], color=_color(index), marker=".",
                  label=f"{summary.name} (lr {summary.best_lr:g}, {seeds_text(len(summary.best_runs))})")
    if drawn:
        bottom, top, log = axis_range(drawn)
        if log:
            _log_y(axes)
        axes.set_ylim(bottom, top)
    if equal_time is not None:
        axes.axvline(equal_time, color="0.4", linestyle=":", linewidth=1,
                     label=f"equal time {equal_time:.1f} s (the per-second table's)")
    if target is not None:
        axes.axhline(target, color="0.2", linestyle=(0, (1, 3)), linewidth=1.2, label=f"target loss {target:.3f}")
    left_out = [s.name for s in summaries if not s.best_runs]
    if left_out:
        axes.text(0.01, 0.01, f"not shown (diverged at every lr): {', '.join(left_out)}", transform=axes.transAxes,
                  fontsize=7, color="0.3", va="bottom")
    axes.set_xlabel("steady training time (s): startup window at the steady step time, evaluation excluded")
    axes.set_xlim(left=0)
    axes.set_ylabel("validation loss (mean over seeds)")
    axes.set_title(f"loss against wall-clock time · {title}", fontsize=10)
    _save(plt, figure, [axes], path, legend=True)


def _curves(plt: Any, summaries: Sequence[VariantSummary], path: Path, title: str) -> None:
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    shown = [(index, summary, *shown_run(summary)) for index, summary in enumerate(summaries)]
    shown = [(index, summary, run, blew) for index, summary, run, blew in shown if run is not None]
    healthy = [val for _, _, run, blew in shown if not blew for _, _, val in points(run) if val is not None]
    every = healthy or [val for _, _, run, _ in shown for _, _, val in points(run)
                        if val is not None and math.isfinite(val)]
    bottom, top, log = axis_range(every) if every else (0.0, 1.0, False)
    for index, summary, run, blew in shown:
        drawn, cut = clip_at(points(run), top)
        if blew and not cut:  # stopped by a numerical error between evaluations: × where it stopped
            drawn.append((run.get("steps_done") or drawn[-1][0], run.get("train_seconds") or drawn[-1][1], top))
            cut = True
        if blew:
            label = f"{summary.name} (diverged, lr {run['lr']:g})"
            style = {"linestyle": "--", "marker": "."}
        else:
            label = f"{summary.name} (lr {summary.best_lr:g})"
            style = {"marker": "."}
        for axes, column in ((by_step, 0), (by_time, 1)):
            axes.plot([p[column] for p in drawn], [p[2] for p in drawn], color=_color(index),
                      label=label if axes is by_step else None, **style)
            if cut:
                axes.plot([drawn[-1][column]], [top], marker="x", markersize=9, color=_color(index), clip_on=False)
    if log:
        _log_y(by_step)
    by_step.set_ylim(bottom, top)
    by_step.set_xlabel("step")
    by_time.set_xlabel("steady training time (s)")
    by_step.set_ylabel("validation loss" + (" (log scale)" if log else ""))
    if by_step.get_legend_handles_labels()[0]:
        by_step.legend(fontsize=8)
    figure.suptitle(f"best run per variant (dashed, ending in ×: diverged at every lr, left the axes) · {title}",
                    fontsize=10)
    _save(plt, figure, [by_step, by_time], path, legend=False)


def sweep_range(summaries: Sequence[VariantSummary]) -> tuple[float, float] | None:
    """The lr axis of ``lr_sweep.png``: the lrs of the variants with a finite loss at some lr (a variant that
    diverged at every lr, often far below the others' lrs, would squash them), else every lr; with a margin."""
    working = [s for s in summaries if any(math.isfinite(mean) for _, mean, _, _ in s.lr_curve)]
    lrs = [lr for s in (working or summaries) for lr, *_ in s.lr_curve]
    return (min(lrs) / 1.6, max(lrs) * 1.6) if lrs else None


def _sweep(plt: Any, summaries: Sequence[VariantSummary], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    finite = [mean + sign * (std or 0.0) for s in summaries for _, mean, std, _ in s.lr_curve
              if math.isfinite(mean) for sign in (-1, 1)]
    top_edge = axes.get_xaxis_transform()  # x in data, y in axes coordinates: 0.97 is the top edge
    span = sweep_range(summaries)
    left_out = []
    for index, summary in enumerate(summaries):
        rows = [(lr, mean, std) for lr, mean, std, _ in summary.lr_curve if math.isfinite(mean)]
        color = _color(index)
        if rows:
            axes.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] or 0.0 for r in rows], marker="o",
                          capsize=3, label=summary.name, color=color)
        failed = [lr for lr, mean, _, _ in summary.lr_curve if not math.isfinite(mean)]
        shown = [lr for lr in failed if span is None or span[0] <= lr <= span[1]]
        if shown:
            axes.scatter(shown, [0.97] * len(shown), marker="x", color=color, transform=top_edge, clip_on=False,
                         label=None if rows else f"{summary.name} (diverged)")
        if not rows and len(shown) < len(failed):
            left_out.append(f"{summary.name} (diverged at lr {', '.join(f'{lr:g}' for lr in failed)})")
    if finite:
        bottom, top, log = axis_range(finite)
        if log:
            _log_y(axes)
        axes.set_ylim(bottom, top)
    axes.set_xscale("log")
    if span is not None:  # the × of a diverged lr, drawn in axes coordinates, does not widen the axis by itself
        axes.set_xlim(*span)
    if left_out:
        axes.text(0.01, 0.01, "not shown: " + "; ".join(left_out), transform=axes.transAxes, fontsize=7,
                  color="0.3", va="bottom")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("final validation loss")
    axes.set_title(f"learning-rate sweep (× at the top: diverged) · {title}", fontsize=10)
    _save(plt, figure, [axes], path, legend=True)
