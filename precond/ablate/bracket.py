"""Learning-rate grids that bracket each variant's best learning rate.

A comparison is only as fair as its tuning: a variant whose best learning rate is the smallest or largest of its
grid may do better outside it. The rule applied to every variant (unless it says ``bracket = false``):

- its best lr is the one with the lowest mean final validation loss over the tuning seeds (``tuning_seeds``,
  every seed by default; a run that diverged counts as ``+inf``, so a diverged neighbour is worse and brackets
  the best from that side);
- the best lr is *inside* when a smaller and a larger lr were tried;
- when it sits at an edge, the grid is extended by one lr beyond that edge, at the ratio of the grid's last step
  on that side (``lr₀² / lr₁`` below, ``lr₋₁² / lr₋₂`` above; a factor :data:`DEFAULT_RATIO` for a grid of one
  lr, which is extended on both sides); when every lr diverged, downwards;
- an extension is decided only once every tuning seed of every lr of the variant has finished, and each variant may
  add at most ``limit`` lrs (``extend_lrs`` in the configuration); past it the variant is reported **not
  bracketed**, loudly, in the summary.

With ``tuning_seeds`` a subset of the seeds (tune on seed 0, say, and replicate on seed 1), the other seeds run
only at a variant's best lr, once its tuning is settled (bracketed, or at its limit): the paired comparison at
the best lrs gets every seed for the price of one seed's grid. The rule is fixed before the replicas run, so
their losses never choose an lr; the best lr carries the tuning seeds' selection bias (a winner's curse that
every variant shares). A variant that diverged at every lr gets no replicas; one with ``lr_from`` or ``expect =
"diverge"`` runs its lrs on every seed (it is not tuned).

A variant with ``expect = "diverge"`` is there to show a failure (Shampoo without grafting): its grid is kept as
given, and the summary reports "diverged at every lr tried, as expected" rather than asking for wider lrs, or
says loudly that it did not diverge.

A variant with ``lr_from = "other"`` runs at the best lr of ``other`` once that one is settled (tuned, or at its
limit) and is not extended itself (e.g. T = 100 at T = 10's best lr). A Muon (or a variant with
``embeddings=adam``) with ``adam_lr_from = "adamw"`` gets ``adam_lr`` = AdamW's best lr once AdamW is settled, then
tunes its own grid as any variant.

:func:`plan` replays these decisions from the finished runs alone, so an interrupted ablation, a resumed one and
``--report-only`` reach the same grid.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any, Optional

import attrs

from precond.ablate.keys import READERS
from precond.ablate.summary import final_loss
from precond.ablate.variants import Variant

DEFAULT_RATIO = 2.0
"""The step of an extension from a grid of a single learning rate."""

Lookup = Callable[[Variant, float, int], "dict[str, Any] | None"]
"""The finished record of ``(variant, lr, seed)``, or ``None``."""


def _rounded(lr: float) -> float:
    """An extension's lr with 4 significant digits (``0.008`` rather than ``0.008000000000000002``)."""
    return float(f"{lr:.4g}")


@attrs.frozen
class Tuning:
    """Where a variant's tuning stands.

    ``state``: ``"inside"`` (best lr strictly inside the grid), ``"limit"`` (at an edge, no extension left: not
    bracketed), ``"fixed"`` (``bracket = false`` or ``lr_from``: the grid is kept as given), ``"pending"`` (runs
    still to finish), ``"waiting"`` (``lr_from`` a variant that is not settled yet), ``"expected"`` (``expect =
    "diverge"`` and it diverged at every lr, its grid kept as given), ``"unexpected"`` (``expect = "diverge"`` but
    some lr did not diverge).
    """

    name: str
    lrs: tuple[float, ...]
    added: tuple[float, ...]
    state: str
    best_lr: float | None = None
    message: str = ""

    @property
    def bracketed(self) -> bool:
        return self.state == "inside"


@attrs.frozen
class Plan:
    """The grid to run now: each runnable variant with its learning rates (the given ones plus extensions, or the
    lr taken from another variant), each variant's :class:`Tuning`, and the seeds the lrs are tuned on
    (``tuning_seeds``; the others run at the best lr only)."""

    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    tunings: dict[str, Tuning]
    tuning_seeds: Optional[tuple[int, ...]] = None

    def lrs_of(self, variant: Variant, seed: int) -> tuple[float, ...]:
        """The lrs ``variant`` runs at with ``seed``: all of them on a tuning seed or for a variant that is not
        tuned (``lr_from``, ``expect = "diverge"``); else the settled best lr, or none yet."""
        lrs = tuple(variant.lrs or ())
        if self.tuning_seeds is None or seed in self.tuning_seeds or variant.lr_from is not None \
                or variant.expected_to_diverge:
            return lrs
        tuning = self.tunings[variant.name]
        settled = tuning.state not in ("pending", "waiting") and tuning.best_lr is not None
        return (tuning.best_lr,) if settled else ()

    def grid(self, every_lr: bool = False) -> list[tuple[Variant, float, int]]:
        """The tuned variants seed by seed, then by position in the lr lists, then by variant (as
        ``AblationConfig.grid``); then, in the same order, the variants that are not tuned (``bracket = false``,
        ``lr_from`` or ``expect = "diverge"``), so a time-limited ablation finishes the comparison of tuned variants
        first. ``every_lr``: every seed at every lr, the runs a report may show (with ``tuning_seeds``, a replica
        seed's runs at other lrs, made before the rule or by hand, are shown but not asked for)."""
        runs = []
        for tuned in (True, False):
            variants = [v for v in self.variants
                        if v.lrs and (v.bracket and v.lr_from is None and not v.expected_to_diverge) == tuned]
            for seed in self.seeds:
                lrs = {v.name: tuple(v.lrs) if every_lr else self.lrs_of(v, seed) for v in variants}
                depth = max((len(lrs[v.name]) for v in variants), default=0)
                runs += [(variant, lrs[variant.name][index], seed) for index in range(depth)
                         for variant in variants if index < len(lrs[variant.name])]
        return runs


def mean_losses(variant: Variant, lrs: Sequence[float], seeds: Sequence[int],
                lookup: Lookup) -> dict[float, float] | None:
    """Mean final loss over ``seeds`` of every lr (``inf`` when a run diverged), or ``None`` while a run is
    missing."""
    means = {}
    for lr in lrs:
        records = [lookup(variant, lr, seed) for seed in seeds]
        if any(record is None for record in records):
            return None
        losses = [final_loss(record) for record in records]
        means[lr] = math.inf if any(math.isinf(x) for x in losses) else statistics.mean(losses)
    return means


def extension(means: dict[float, float]) -> tuple[float | None, list[float], str]:
    """``(best lr, lrs to add, which edge)`` for the mean losses by lr: nothing to add when the best is inside."""
    lrs = sorted(means)
    best = min(lrs, key=lambda lr: (means[lr], lr))
    low_ratio = lrs[1] / lrs[0] if len(lrs) > 1 else DEFAULT_RATIO
    high_ratio = lrs[-1] / lrs[-2] if len(lrs) > 1 else DEFAULT_RATIO
    if math.isinf(means[best]):
        return None, [_rounded(lrs[0] / low_ratio)], "every lr diverged"
    new, edges = [], []
    if best == lrs[0]:
        new.append(_rounded(lrs[0] / low_ratio))
        edges.append("lower")
    if best == lrs[-1]:
        new.append(_rounded(lrs[-1] * high_ratio))
        edges.append("upper")
    return best, new, " and ".join(edges)


def _fmt(lrs: Sequence[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in sorted(lrs))


def tune(variant: Variant, base: Sequence[float], seeds: Sequence[int], lookup: Lookup,
         limit: int) -> tuple[list[float], Tuning]:
    """Extend ``base`` as far as the finished runs decide; return the lrs to run and the tuning state."""
    lrs = list(base)
    while True:
        added = tuple(lrs[len(base):])
        means = mean_losses(variant, lrs, seeds, lookup)
        if means is None:
            return lrs, Tuning(variant.name, tuple(lrs), added, "pending",
                               message="runs still to finish" + (f" (grid extended by {_fmt(added)})" if added else ""))
        best, new, edge = extension(means)
        if variant.expected_to_diverge:
            if best is None:
                return lrs, Tuning(variant.name, tuple(lrs), added, "expected", None,
                                   f"diverged at every lr tried ({_fmt(lrs)}), as expected (expect = \"diverge\"); "
                                   "its grid is not extended")
            return lrs, Tuning(variant.name, tuple(lrs), added, "unexpected", best,
                               f"expected to diverge (expect = \"diverge\") but did not: best lr {best:g} of the "
                               f"grid {_fmt(lrs)}, kept as given")
        if not variant.bracket:
            note = f"; the best lr is at the {edge} edge" if new and best is not None else ""
            return lrs, Tuning(variant.name, tuple(lrs), added, "fixed", best,
                               f"grid {_fmt(lrs)} kept as given (bracket = false){note}")
        if not new:
            grown = f" after extending the grid by {_fmt(added)}" if added else ""
            return lrs, Tuning(variant.name, tuple(lrs), added, "inside", best,
                               f"best lr {best:g} is inside the grid {_fmt(lrs)}{grown}")
        if len(added) + len(new) > limit:
            where = (f"diverged at every lr tried ({_fmt(lrs)})" if best is None
                     else f"best lr {best:g} is at the {edge} edge of the grid {_fmt(lrs)}")
            spent = ("and extend_lrs = 0 adds none" if limit == 0 else
                     f"and {len(added)} of at most {limit} extra lrs (extend_lrs) were already added")
            return lrs, Tuning(variant.name, tuple(lrs), added, "limit", best,
                               f"NOT BRACKETED: {where}, {spent}; widen its lrs and run again")
        lrs += new


def plan(config: Any, lookup: Lookup) -> Plan:
    """The grid implied by ``config`` and the finished runs (``lookup``), with every variant's tuning state."""
    seeds = tuple(config.seeds_tuned())
    limit = config.extend_lrs
    runnable = config.runnable()
    chosen: dict[str, tuple[float, ...]] = {}
    tunings: dict[str, Tuning] = {}
    resolved = {}
    for variant in runnable:
        if variant.lr_from is None and variant.adam_lr_from is None:
            lrs, tunings[variant.name] = tune(variant, variant.lrs or config.lrs, seeds, lookup, limit)
            chosen[variant.name], resolved[variant.name] = tuple(lrs), variant
    for variant in runnable:
        if variant.adam_lr_from is None:
            continue
        source, why = _tuned_source(tunings, variant.adam_lr_from)
        if why is not None:
            tunings[variant.name] = Tuning(variant.name, (), (), "waiting", message=(
                f"its Adam part runs at the best lr of {variant.adam_lr_from}, which {why}"))
            continue
        settings = dict(variant.settings)
        settings["adam_lr"] = source.best_lr
        variant = attrs.evolve(variant, settings=tuple(sorted(settings.items(), key=lambda item: _order(item[0]))))
        lrs, tuning = tune(variant, variant.lrs or config.lrs, seeds, lookup, limit)
        tunings[variant.name] = attrs.evolve(tuning, message=f"{tuning.message} (adam_lr {source.best_lr:g}, the best "
                                                             f"lr of {variant.adam_lr_from})")
        chosen[variant.name], resolved[variant.name] = tuple(lrs), variant
    for variant in runnable:
        if variant.lr_from is None:
            continue
        source, why = _tuned_source(tunings, variant.lr_from)
        if why is not None:
            tunings[variant.name] = Tuning(variant.name, (), (), "waiting",
                                           message=f"runs at the best lr of {variant.lr_from}, which {why}")
            continue
        lr = source.best_lr
        done = mean_losses(variant, [lr], config.seeds, lookup) is not None
        tunings[variant.name] = Tuning(
            variant.name, (lr,), (), "fixed" if done else "pending", lr if done else None,
            f"runs at the best lr of {variant.lr_from} ({lr:g}); not tuned itself")
        chosen[variant.name], resolved[variant.name] = (lr,), variant
    variants = tuple(attrs.evolve(resolved[v.name], lrs=chosen[v.name]) for v in runnable if v.name in chosen)
    return Plan(variants, tuple(config.seeds), {v.name: tunings[v.name] for v in runnable}, config.tuning_seeds)


def _tuned_source(tunings: dict[str, Tuning], name: str) -> tuple[Optional[Tuning], Optional[str]]:
    """The tuning of the variant ``name`` another variant borrows its lr from, and why it cannot yet (None if it
    can)."""
    source = tunings.get(name)
    if source is None:
        return None, "is not run here"
    if source.state in ("limit", "expected") and source.best_lr is None:
        return source, "diverged at every lr"
    if source.state in ("pending", "waiting") or source.best_lr is None:
        return source, "is not tuned yet"
    return source, None


def _order(key: str) -> int:
    return list(READERS).index(key)
