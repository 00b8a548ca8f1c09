"""The compatibility table: every combination of options and parts that cannot work, refused at construction.

A configuration is described by its *features* (``capture``, ``distributed``, ``blocked``, …: see
:func:`option_features`, :func:`parallel_features`, :func:`group_features`, :func:`structure_features`); a
:class:`Rule` refuses every configuration that has all of its features, with a message that says why and what to
use instead. :data:`RULES` is the one table: ``precond.Optimizer``, ``precond.DataParallel`` and the presets ask
:func:`check` at construction (and ``add_param_group``), so an unsupported combination never fails later, inside
a step; the battery (``tests/test_battery.py``) reads the same table to know which of its combinations must be
refused.

The same features choose what runs an allowed configuration (``docs/design.md``, "Architecture"): the
:data:`RUNTIMES` line of the first runtime whose features it has (where the step's work runs: one process, or
spread over ranks) and the :data:`EXECUTORS` lines of every executor whose features it has (how a bucket's step is
run: eagerly, replayed as a CUDA graph, inside the backward pass), each bucket going to the first executor that
takes it. A new executor or runtime is one module plus one :class:`Line` here (and the rules that refuse what it
cannot do).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

import attrs

# --- features ------------------------------------------------------------------------------------------------------
CAPTURE = "capture"
OVERLAP = "overlap_backward"
CHECKS_GRADIENTS = "on_nonfinite checks gradients"
ASYNC = "async_refresh"
DISTRIBUTED = "distributed"
OWNER = "mode='owner'"
REPLICATE = "mode='replicate'"
BY_KIND = "placement='by_kind'"
BLOCKED = "parameters cut into blocks"
LAYER_STATISTICS = "an estimator of whole layers"
PER_EXAMPLE_MOMENT = "a dense spectrum of per-example moments of whole layers"
LARGE_BLOCK = "large='block'"
NO_BLOCKS = "a structure without blocks"
AVERAGED_STATISTICS = "K-FAC's statistics averaged over the ranks"
SHARDED = "parameters sharded as DTensors (FSDP2)"
DRIFT = "drift_tolerance"


@attrs.frozen
class Rule:
    """Refuses every configuration with all of ``features``: ``reason`` (why it cannot work, may name
    ``{params}`` or ``{structure}``) and ``remedy`` (what to use instead) make the message."""

    name: str
    features: frozenset[str] = attrs.field(converter=frozenset)
    reason: str
    remedy: str

    def message(self, **details: Any) -> str:
        return f"{self.reason.format(**details)}: {self.remedy.format(**details)}"


RULES: tuple[Rule, ...] = (
    Rule("capture_distributed", {CAPTURE, DISTRIBUTED},
         "capture is a single-process path for now, and the distributed step exchanges the updates before moving "
         "the weights",
         "with distributed=..., leave capture off"),
    Rule("overlap_distributed", {OVERLAP, DISTRIBUTED},
         "overlap_backward is a single-process path for now, and the distributed step exchanges the updates before "
         "moving the weights",
         "with distributed=..., leave overlap_backward off"),
    Rule("overlap_capture", {OVERLAP, CAPTURE},
         "overlap_backward and capture are alternatives: the gradient hooks run the eager step (replaying captured "
         "graphs from them is not supported)",
         "pick one"),
    Rule("overlap_checks_gradients", {OVERLAP, CHECKS_GRADIENTS},
         "overlap_backward=True starts each step during the backward pass, so a non-finite gradient could not be "
         "refused afterwards",
         "pass on_nonfinite='ignore' with it"),
    Rule("replicate_async", {REPLICATE, ASYNC},
         "precond.DataParallel(mode='replicate') spreads the refreshes over ranks itself",
         "build the optimizer with async_refresh=False"),
    Rule("replicate_by_kind", {REPLICATE, BY_KIND},
         "placement='by_kind' chooses the owner of each parameter, and mode='replicate' has none (every rank keeps "
         "every state)",
         "use mode='owner', or leave placement at its default"),
    Rule("owner_per_example_moment", {OWNER, PER_EXAMPLE_MOMENT},
         "EKFAC's per-example moment (moment='per_example') is computed in the Kronecker basis, which in "
         "DataParallel(mode='owner') only the owner of a layer keeps, so the other ranks' examples cannot be "
         "averaged into it",
         "use moment='batch', or DataParallel(mode='replicate') (every rank keeps every basis)"),
    Rule("block_structure", {LARGE_BLOCK, NO_BLOCKS},
         "large='block' cuts modes above max_dim into blocks, which {structure} (this preset's structure) does not "
         "do",
         "use a preset with NMode (shampoo, soap, kl_shampoo, …) or large='none'/'diagonal'"),
    Rule("blocked_layer_statistics", {BLOCKED, LAYER_STATISTICS},
         "parameter(s) {params} are cut into blocks (a structure with large='block'), but {estimator} builds its "
         "factors from whole layers' inputs and output gradients",
         "use structures.LayerMatrix (as precond.kfac does) or a max_dim above the layer's modes"),
    Rule("blocked_overlap", {BLOCKED, OVERLAP},
         "parameter(s) {params} are cut into blocks (a structure with large='block'), which overlap_backward=True "
         "does not support yet",
         "leave overlap_backward off, or give those parameters large='none'/'diagonal' or a max_dim above their "
         "modes"),
    Rule("drift_overlap", {DRIFT, OVERLAP},
         "drift_tolerance measures each basis before the step's fold, which overlap_backward=True starts inside the "
         "backward pass",
         "leave overlap_backward off with drift_tolerance"),
    Rule("drift_distributed", {DRIFT, DISTRIBUTED},
         "drift_tolerance is a single-process path for now: the ranks would have to agree on which refreshes run",
         "with distributed=..., leave drift_tolerance at None"),
    Rule("blocked_distributed", {BLOCKED, DISTRIBUTED},
         "parameter(s) {params} are cut into blocks (a structure with large='block'), which distributed=... does "
         "not support yet",
         "leave distributed off, or give those parameters large='none'/'diagonal' or a max_dim above their modes"),
)
"""The table, in the order its rules are tried (the first that applies is reported)."""

RUN_TIME_RULES: tuple[Rule, ...] = (
    Rule("overlap_averaged_statistics", {OVERLAP, AVERAGED_STATISTICS},
         "K-FAC's statistics are averaged over the ranks at the start of optimizer.step() (torch.distributed is "
         "initialised and the capture's group has more than one rank), but overlap_backward=True steps the layers "
         "during the backward pass, before that",
         "in data-parallel training, leave overlap_backward off, or give the capture group='local' (each rank its "
         "own statistics)"),
)
"""Rules of the same form whose features are run-time state, not configuration: whether K-FAC's statistics are
averaged depends on ``torch.distributed`` being initialised with more than one rank (plain DDP, no
``precond.DataParallel``, whose ``overlap_distributed`` the table has) and on the capture's ``group``, which may
change until the first step. So they are not in :data:`RULES` (not asked at construction, nor by the battery's
verdicts); :meth:`precond.KFACCapture.attach` raises them as :class:`Incompatible`, with the same message form."""

BY_NAME = {rule.name: rule for rule in (*RULES, *RUN_TIME_RULES)}


class Incompatible(ValueError):
    """A combination the table refuses: ``rule`` is the table's rule, ``features`` what the configuration had."""

    def __init__(self, rule: Rule, features: frozenset[str], details: Mapping[str, Any]) -> None:
        super().__init__(rule.message(**details))
        self.rule = rule
        self.features = features


# --- what runs an allowed configuration -----------------------------------------------------------------------------
@attrs.frozen
class Line:
    """A runtime or an executor: chosen where the configuration has all of ``features``; ``implementation``
    (``"module:attribute"``, imported when chosen) is built with the optimizer's engine (an executor) or with the
    ``distributed=`` configuration and the engine (a runtime)."""

    name: str
    features: frozenset[str] = attrs.field(converter=frozenset)
    implementation: str

    def load(self) -> Any:
        module, _, attribute = self.implementation.partition(":")
        return getattr(importlib.import_module(module), attribute)


RUNTIMES: tuple[Line, ...] = (
    Line("fsdp2", {OWNER, SHARDED}, "precond.distributed.sharded:ShardedOwnerRuntime"),
    Line("owner", {OWNER}, "precond.distributed.owner:OwnerRuntime"),
    Line("replicate", {REPLICATE}, "precond.distributed.replicate:ReplicateRuntime"),
    Line("single", (), "precond.runtime:SingleProcess"),
)
"""Where a step's work runs (``precond.runtime``): the first line whose features the configuration has."""

EXECUTORS: tuple[Line, ...] = (
    Line("in_backward", {OVERLAP}, "precond.overlap:InBackward"),
    Line("captured", {CAPTURE}, "precond.captured:Captured"),
    Line("eager", (), "precond.executors:Eager"),
)
"""How a bucket's step runs (``precond.executors``): every line whose features the configuration has, in this
order; each bucket is run by the first of them that takes it (the eager one takes every bucket)."""


def runtime(features: Iterable[str], lines: Sequence[Line] = ()) -> Line:
    """The :data:`RUNTIMES` line of a configuration with ``features`` (``lines``: another table, for tests)."""
    features = frozenset(features)
    return next(line for line in (lines or RUNTIMES) if line.features <= features)


def executors(features: Iterable[str], lines: Sequence[Line] = ()) -> list[Line]:
    """The :data:`EXECUTORS` lines of a configuration with ``features``, in the order they are offered a bucket."""
    features = frozenset(features)
    return [line for line in (lines or EXECUTORS) if line.features <= features]


# --- what a configuration has --------------------------------------------------------------------------------------
def option_features(capture: Any = False, overlap_backward: bool = False, on_nonfinite: str = "raise",
                    async_refresh: bool = False, distributed: Any = None, drift: bool = False) -> frozenset[str]:
    """The features of ``precond.Optimizer``'s options (``distributed``: a ``precond.DataParallel`` or None)."""
    found = set()
    if capture:
        found.add(CAPTURE)
    if overlap_backward:
        found.add(OVERLAP)
    if on_nonfinite != "ignore":
        found.add(CHECKS_GRADIENTS)
    if async_refresh:
        found.add(ASYNC)
    if drift:
        found.add(DRIFT)
    if distributed is not None:
        found |= parallel_features(distributed.mode, getattr(distributed, "placement", "balanced"))
    return frozenset(found)


def parallel_features(mode: str, placement: str = "balanced") -> frozenset[str]:
    """The features of a ``precond.DataParallel(mode=..., placement=...)`` (or of another ``distributed=``
    configuration with a ``mode``: its feature is ``f"mode={mode!r}"``, as :data:`OWNER` and :data:`REPLICATE`)."""
    found = {DISTRIBUTED, f"mode={mode!r}"}
    if placement == "by_kind":
        found.add(BY_KIND)
    return frozenset(found)


def parameter_features(params: Iterable[Any]) -> frozenset[str]:
    """:data:`SHARDED` when any parameter is a DTensor (FSDP2's ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return frozenset()
    return frozenset({SHARDED}) if any(isinstance(p, DTensor) for p in params) else frozenset()


def group_features(group: Mapping[str, Any]) -> frozenset[str]:
    """The features of one param group (its ``params`` and ``preconditioner``)."""
    preconditioner = group["preconditioner"]
    found = set()
    if any(preconditioner.blocks(p.shape) is not None for p in group["params"]):
        found.add(BLOCKED)
    estimator = preconditioner.estimator
    if estimator.needs_whole_parameters:
        found.add(LAYER_STATISTICS)
        factors = getattr(estimator, "factors", None)  # a dense spectrum over K-FAC's factors (EKFAC)
        if getattr(factors, "needs_whole_parameters", False) and getattr(factors, "moment", None) == "per_example":
            found.add(PER_EXAMPLE_MOMENT)
    return frozenset(found)


def structure_features(structure: Any, large: Optional[str]) -> frozenset[str]:
    """The features of a preset's ``large=`` keyword on its structure (only ``NMode`` cuts blocks)."""
    from structures import NMode

    if large != "block":
        return frozenset()
    return frozenset({LARGE_BLOCK} | (set() if isinstance(structure, NMode) else {NO_BLOCKS}))


# --- the verdict ---------------------------------------------------------------------------------------------------
def refusal(features: Iterable[str]) -> Optional[Rule]:
    """The first rule of the table that refuses a configuration with ``features`` (None: it is allowed)."""
    features = frozenset(features)
    return next((rule for rule in RULES if rule.features <= features), None)


def check(features: Iterable[str], **details: Any) -> None:
    """Raise :class:`Incompatible` (a ``ValueError``) with the message of the first rule that refuses
    ``features``; ``details`` fill the message (``params``, ``estimator``, ``structure``)."""
    features = frozenset(features)
    rule = refusal(features)
    if rule is not None:
        raise Incompatible(rule, features, details)


def check_groups(options: frozenset[str], groups: Iterable[Mapping[str, Any]],
                 name: Callable[[Any], str]) -> None:
    """:func:`check` each param group with the optimizer's option features; ``name(p)`` names a parameter."""
    for group in groups:
        preconditioner = group["preconditioner"]
        blocked = [name(p) for p in group["params"] if preconditioner.blocks(p.shape) is not None]
        check(options | group_features(group), params=", ".join(blocked),
              estimator=type(preconditioner.estimator).__name__)
