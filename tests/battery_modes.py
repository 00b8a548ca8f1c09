"""The modes the battery runs every registry entry through, and what each promises (``precond.Optimizer``'s
docstring, ``precond.refresh_schedule``, ``precond.overlap``, ``precond.captured``, ``docs/scaling.md``).

A mode is a set of constructor keywords and a promise against a reference mode of the same entry:

- ``"bitwise"``: the same parameters bit for bit — asynchronous refreshes ("exactly those of the synchronous
  schedule"), ``overlap_backward`` ("the arithmetic is the ordinary step's, so the updates are identical"), and
  owner (with asynchronous refreshes) and replicate modes with ``stack=False`` against one process with
  ``stack=False`` (every parameter in a bucket of its own on both sides, the updates and refreshes exchanged in the
  state dtype: the same kernels on the same operands), staggered so that every rank refreshes at every step;
- ``"roundoff"``: the same updates up to round-off — ``stack=False`` (the simple reference path), the emulated
  captured step (bias corrections and ``lr`` as device tensors: "to float64 round-off of the host's"), with
  ``large="block"`` the parameters that are not cut (stepped in other buckets, by the same arithmetic), and owner
  and replicate modes with stacking (an owner stacks fewer parameters than one process, a replicate rank refreshes
  a part of a bucket: batched float64 kernels do not give each entry the bits it gets in another batch, which the
  float32 parity of ``tests/test_distributed.py`` happens to see on CPU);
- ``None``: a schedule of its own (``stagger``: each factor at its own phase; ``drift_tolerance``: only the bases
  that drifted are refreshed), checked finite and moving.

``drift_tolerance=0`` refreshes every basis its schedule names (every ratio is at least 0), so it promises the
plain mode's bits; ``refresh_budget=1`` allows a step all the refresh work there is, so it grants every drifted basis
and promises the bits of the drift mode without a budget.

A mode whose keywords the compatibility table (``precond.compatibility``) refuses for an entry is expected to be
refused at construction with the table's message; the refused combinations are modes here too, so the battery
meets every rule of the table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import precond
from precond import compatibility
from tests.battery_problem import DTYPE

_OPTIMIZER_FEATURES = ("capture", "overlap_backward", "on_nonfinite", "async_refresh")


@dataclasses.dataclass(frozen=True)
class Mode:
    """Constructor keywords, the ``precond.DataParallel`` keywords (``parallel``; None: one process), the
    reference mode and the promise."""

    name: str
    options: dict[str, Any]
    reference: Optional[str] = None
    promise: Optional[str] = None
    parallel: Optional[dict[str, Any]] = None

    def keywords(self) -> dict[str, Any]:
        """The keywords for the entry's constructor: state (and the exchanged updates) in float64, for tight
        comparisons. Makes the ``DataParallel`` (which checks its own fields against the table)."""
        out = {"state_dtype": DTYPE, **self.options}
        if self.parallel is not None:
            out["distributed"] = precond.DataParallel(**self.parallel, comm_dtype=DTYPE)
        return out

    @property
    def ranks(self) -> int:
        return 1 if self.parallel is None else 2

    @property
    def blocks(self) -> bool:
        return self.options.get("large") == "block"

    def features(self) -> frozenset[str]:
        """What the compatibility table sees of this mode's options (without the entry's parts)."""
        options = {k: v for k, v in self.options.items() if k in _OPTIMIZER_FEATURES}
        found = compatibility.option_features(**options, drift=self.options.get("drift_tolerance") is not None)
        if self.parallel is not None:
            found |= compatibility.parallel_features(**self.parallel)
        return found


_IGNORE = {"on_nonfinite": "ignore"}
_OWNER = {"mode": "owner"}
_REPLICATE = {"mode": "replicate"}
MODES: tuple[Mode, ...] = (
    Mode("plain", {}),
    Mode("ignore", _IGNORE, "plain", "bitwise"),
    Mode("stack_off", {"stack": False}, "plain", "roundoff"),
    Mode("stagger", {"stagger": True}),
    Mode("stagger_unstacked", {"stagger": True, "stack": False}, "stagger", "roundoff"),
    Mode("async", {"stagger": True, "async_refresh": True}, "stagger", "bitwise"),
    Mode("async_unstaggered", {"async_refresh": True}, "plain", "bitwise"),
    Mode("capture", {"capture": "emulate"}, "plain", "roundoff"),
    Mode("overlap", {"overlap_backward": True, **_IGNORE}, "plain", "bitwise"),
    Mode("overlap_checked", {"overlap_backward": True}),
    Mode("overlap_capture", {"overlap_backward": True, "capture": "emulate", **_IGNORE}),
    Mode("drift_zero", {"drift_tolerance": 0.0}, "plain", "bitwise"),
    Mode("drift", {"drift_tolerance": 0.3, "stagger": True}),
    Mode("drift_budget", {"drift_tolerance": 0.3, "stagger": True, "refresh_budget": 4}),
    Mode("drift_budget_all", {"drift_tolerance": 0.3, "stagger": True, "refresh_budget": 1}, "drift", "bitwise"),
    Mode("drift_overlap", {"drift_tolerance": 0.3, "overlap_backward": True, **_IGNORE}),
    Mode("block", {"large": "block"}, "plain", "roundoff"),
    Mode("block_overlap", {"large": "block", "overlap_backward": True, **_IGNORE}),
    Mode("owner", {}, "plain", "roundoff", _OWNER),
    Mode("replicate", {}, "plain", "roundoff", _REPLICATE),
    Mode("owner_unstacked", {"stack": False, "stagger": True, "async_refresh": True}, "stagger_unstacked", "bitwise",
         _OWNER),
    Mode("replicate_unstacked", {"stack": False, "stagger": True}, "stagger_unstacked", "bitwise", _REPLICATE),
    Mode("owner_capture", {"capture": "emulate"}, parallel=_OWNER),
    Mode("owner_overlap", {"overlap_backward": True, **_IGNORE}, parallel=_OWNER),
    Mode("owner_block", {"large": "block"}, parallel=_OWNER),
    Mode("replicate_async", {"stagger": True, "async_refresh": True}, parallel=_REPLICATE),
    Mode("replicate_by_kind", {}, parallel={"mode": "replicate", "placement": "by_kind"}),
    Mode("owner_drift", {"drift_tolerance": 0.3}, parallel=_OWNER),
)
"""Every mode; those without a promise either have a schedule of their own (``stagger``) or are combinations the
table refuses (the battery checks that it does, for every entry the combination applies to)."""

BY_NAME = {mode.name: mode for mode in MODES}
