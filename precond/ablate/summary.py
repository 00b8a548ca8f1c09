"""Aggregate finished runs per variant: the best learning rate, its final loss over seeds, and the speed to a target."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable, Optional, Sequence

import attrs

from precond.ablate.divergence import diverged

Record = dict[str, Any]


def final_loss(record: Record) -> float:
    """The run's final validation loss, ``inf`` if it diverged (:func:`precond.ablate.divergence.diverged`)."""
    return math.inf if diverged(record) else float(record["final_val"])


def time_to(record: Record, target: float) -> Optional[tuple[int, float]]:
    """``(step, train seconds)`` of the first evaluation at or below ``target``; ``None`` if never reached."""
    curve = record["curve"]
    for step, val, seconds in zip(curve["step"], curve["val"], curve["seconds"], strict=True):
        if val is not None and val <= target:
            return step, seconds
    return None


@attrs.frozen
class VariantSummary:
    """One row of the table: a variant at its best learning rate (lowest mean final loss over seeds)."""

    name: str
    best_lr: Optional[float]
    final_mean: float
    final_std: Optional[float]
    best_runs: tuple[Record, ...]
    all_runs: tuple[Record, ...]
    diverged: int
    lr_curve: tuple[tuple[float, float, Optional[float], int], ...]
    """``(lr, mean final loss, std, diverged count)`` for every learning rate tried, sorted by lr."""

    def best_run(self) -> Optional[Record]:
        """The single best run (lowest final loss) at the best learning rate."""
        return min(self.best_runs, key=final_loss) if self.best_runs else None

    @property
    def best_lr_at_edge(self) -> bool:
        """Whether the best learning rate is the smallest or largest of two or more tried (the optimum may lie
        outside the grid)."""
        lrs = [lr for lr, *_ in self.lr_curve]
        return self.best_lr is not None and len(lrs) > 1 and self.best_lr in (lrs[0], lrs[-1])

    def to_target(self, target: float) -> tuple[Optional[float], Optional[float], int]:
        """Mean steps and seconds to ``target`` over the best-lr runs that reach it, and how many do."""
        reached = [hit for hit in (time_to(r, target) for r in self.best_runs) if hit is not None]
        if not reached:
            return None, None, 0
        return (statistics.mean(step for step, _ in reached), statistics.mean(s for _, s in reached), len(reached))

    @property
    def runs(self) -> int:
        return len(self.all_runs)

    def largest(self, field: str) -> Optional[float]:
        """The largest value of ``field`` over all the variant's runs (memory does not depend on the lr)."""
        values = [r[field] for r in self.all_runs if r.get(field) is not None]
        return max(values) if values else None

    def mean_of(self, field: str) -> Optional[float]:
        values = [r[field] for r in self.best_runs if r.get(field) is not None]
        return statistics.mean(values) if values else None


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    if any(math.isinf(v) for v in values):
        return math.inf, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(records: Iterable[Record], names: Sequence[str],
              tuning_seeds: Optional[Sequence[int]] = None) -> list[VariantSummary]:
    """One summary per variant name in ``names`` that has finished runs, in that order. The best lr is the one
    with the lowest mean final loss over the runs of ``tuning_seeds`` (every seed when ``None``), as the
    workbench's tuning chose it (:mod:`precond.ablate.bracket`); its row then holds every seed run there."""
    by_name: dict[str, dict[float, list[Record]]] = {}
    for record in records:
        by_name.setdefault(record["variant"], {}).setdefault(record["lr"], []).append(record)
    summaries = []
    for name in names:
        by_lr = by_name.get(name)
        if not by_lr:
            continue
        lr_curve = []
        for lr in sorted(by_lr):
            mean, std = _mean_std([final_loss(r) for r in by_lr[lr]])
            lr_curve.append((lr, mean, std, sum(diverged(r) for r in by_lr[lr])))
        best_lr, best_mean, best_std, _ = min(lr_curve, key=lambda row: (_tuning_mean(by_lr[row[0]], tuning_seeds),
                                                                          row[1]))
        finite = math.isfinite(best_mean)
        all_runs = [r for runs in by_lr.values() for r in runs]
        summaries.append(VariantSummary(
            name=name, best_lr=best_lr if finite else None, final_mean=best_mean, final_std=best_std,
            best_runs=tuple(by_lr[best_lr]) if finite else (), all_runs=tuple(all_runs),
            diverged=sum(diverged(r) for r in all_runs), lr_curve=tuple(lr_curve)))
    return summaries


def _tuning_mean(runs: Sequence[Record], tuning_seeds: Optional[Sequence[int]]) -> float:
    """The mean final loss of the runs of ``tuning_seeds`` (all runs when ``None``); ``inf`` where a run diverged,
    and where no tuning seed ran at this lr, so that an lr run on a replica seed alone is never chosen."""
    chosen = [r for r in runs if tuning_seeds is None or r["seed"] in tuning_seeds]
    return _mean_std([final_loss(r) for r in chosen])[0] if chosen else math.inf


def reference_of(summaries: Sequence[VariantSummary], baselines: Sequence[str]) -> Optional[VariantSummary]:
    """The variant differences are taken against: the best (lowest mean final loss) of ``baselines`` that did
    not diverge, else the best variant of all."""
    finite = [s for s in summaries if math.isfinite(s.final_mean)]
    pool = [s for s in finite if s.name in baselines] or finite
    return min(pool, key=lambda s: (s.final_mean, s.name)) if pool else None


def paired(
    a: VariantSummary, b: VariantSummary, value: Callable[[Record], Optional[float]] = final_loss
) -> list[float]:
    """``value(a's run) − value(b's run)`` for every seed both ran at their best learning rates (in seed order),
    skipping a seed where either value is missing."""
    runs_a = {r["seed"]: r for r in a.best_runs}
    runs_b = {r["seed"]: r for r in b.best_runs}
    differences = []
    for seed in sorted(set(runs_a) & set(runs_b)):
        x, y = value(runs_a[seed]), value(runs_b[seed])
        if x is not None and y is not None:
            differences.append(x - y)
    return differences


def auto_target(summaries: Sequence[VariantSummary]) -> Optional[float]:
    """The weakest variant's best final loss: a level every variant that did not diverge at all its learning
    rates reaches at its best lr. A diverged run never sets it (its final loss counts as ``inf``)."""
    finals = [s.final_mean for s in summaries if math.isfinite(s.final_mean)]
    return max(finals) if finals else None
