"""The two figures of an ablation (matplotlib, Agg backend: no display needed).

- ``loss_curves.png``: validation loss of each variant's best run against steps and against training time;
- ``lr_sweep.png``: final validation loss against learning rate (log x), mean ± std over seeds; a learning
  rate at which a run diverged is marked ``×`` at the top of the axes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from precond.ablate.summary import VariantSummary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(index: int) -> str:
    """The same colour for a variant in both figures (matplotlib's default cycle)."""
    return f"C{index % 10}"


def write_plots(summaries: Sequence[VariantSummary], out: Path, title: str = "") -> dict[str, Path]:
    """Write both figures into ``out``; raises ``ImportError`` without matplotlib."""
    plt = _pyplot()
    files = {"curves": out / "loss_curves.png", "lr_sweep": out / "lr_sweep.png"}
    _curves(plt, summaries, files["curves"], title)
    _sweep(plt, summaries, files["lr_sweep"], title)
    return files


def _curves(plt, summaries: Sequence[VariantSummary], path: Path, title: str) -> None:
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    finals = []
    for index, summary in enumerate(summaries):
        run = summary.best_run()
        if run is None:
            continue
        curve = run["curve"]
        points = [(s, t, v) for s, t, v in zip(curve["step"], curve["seconds"], curve["val"]) if v is not None]
        label = f"{summary.name} (lr {summary.best_lr:g})"
        by_step.plot([p[0] for p in points], [p[2] for p in points], marker=".", label=label, color=_color(index))
        by_time.plot([p[1] for p in points], [p[2] for p in points], marker=".", color=_color(index))
        finals.append(points[-1][2])
        if len(points) > 2:
            finals.append(points[1][2])
    if finals:  # the step-0 loss would flatten everything else
        low, high = min(finals), max(finals)
        by_step.set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    by_step.set_xlabel("step")
    by_time.set_xlabel("training time (s)")
    by_step.set_ylabel("validation loss")
    if by_step.get_legend_handles_labels()[0]:
        by_step.legend(fontsize=8)
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
    figure.suptitle(f"best run per variant · {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _sweep(plt, summaries: Sequence[VariantSummary], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    finite = [mean for s in summaries for _, mean, _, _ in s.lr_curve if math.isfinite(mean)]
    top = max(finite) if finite else 1.0
    for index, summary in enumerate(summaries):
        rows = [(lr, mean, std) for lr, mean, std, _ in summary.lr_curve if math.isfinite(mean)]
        color = _color(index)
        if rows:
            axes.errorbar([r[0] for r in rows], [r[1] for r in rows], yerr=[r[2] or 0.0 for r in rows], marker="o",
                          capsize=3, label=summary.name, color=color)
        failed = [lr for lr, mean, _, _ in summary.lr_curve if not math.isfinite(mean)]
        if failed:
            axes.scatter(failed, [top] * len(failed), marker="x", color=color,
                         label=None if rows else f"{summary.name} (diverged)")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("final validation loss")
    axes.set_title(f"learning-rate sweep · {title}", fontsize=10)
    axes.grid(alpha=0.3, which="both")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
