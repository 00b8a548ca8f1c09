"""Where a step's work runs: the runtime of a ``precond.Optimizer`` (one process by default, as Meta's Distributed
Shampoo's default distributor).

The optimizer's engine (``precond.engine``) always talks to one runtime, chosen by the compatibility table
(``precond.compatibility.RUNTIMES``) from the ``distributed=`` configuration, through the small interface of
:class:`Runtime`: which members the buckets stack (``members``: a parameter, or each block of one cut by its
structure, ``precond.blocking``), which gradients this process steps once they are judged (:meth:`Runtime.gradients`),
where the parameters are moved (:meth:`Runtime.move`), who computes a due refresh (:meth:`Runtime.refresh`), the end
of a step (:meth:`Runtime.finish`, :meth:`Runtime.end`) and the fallback counts (:meth:`Runtime.stats`). A runtime
reads the engine only through :class:`Host`.

:class:`SingleProcess` is the default: every gradient judged with one host synchronisation
(``precond.gradient_check``), every refresh computed here, and the parameter moves of a step held back and made
together (``precond.moves``). The distributed runtimes (``precond.distributed``) derive from :class:`Runtime`.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from precond.blocking import Members
from precond.buckets import Bucket
from precond.gradient_check import Work, largest_entries
from precond.moves import PendingMoves, move


class Host(Protocol):
    """What a runtime reads and calls of the step that runs it (``precond.engine.Engine``)."""

    param_groups: list[dict[str, Any]]
    state: Any
    state_dtype: torch.dtype
    on_nonfinite: str

    def name(self, p: torch.Tensor) -> str:
        """How a message names ``p`` (its ``named_parameters`` name, else its shape; a block as such)."""

    def verdict(self, work: Work, values: list[float]) -> Optional[Work]:
        """``precond.gradient_check.verdict`` with the optimizer's policy, names and counters."""

    def refresh_units(self) -> list[tuple[tuple[int, int], int, int]]:
        """Every refreshable mode of every member: ``((id(p), k), d_k, T)``, in parameter order."""

    def refresh_offset(self, key: tuple[int, int]) -> Optional[int]:
        """The stagger offset of a refresh unit (None before the schedule was planned)."""

    def forget_buckets(self) -> None:
        """Make the buckets be rebuilt from the per-parameter states at the next step (after a state was dropped)."""


class Runtime:
    """The interface between a step and where it runs; the defaults are those of one process, moving each bucket's
    parameters at once. ``config`` is the optimizer's ``distributed=`` value (None for one process) and ``host`` the
    engine it serves."""

    def __init__(self, config: Any, host: Host) -> None:
        self.config = config
        self.host = host
        self.members = Members()
        """Blocking: the members the buckets stack (``precond.blocking.Members``)."""

    def gradients(self, work: Work) -> Optional[Work]:
        """The ``(group, p, grad)`` this process steps, judged (``on_nonfinite``): None when the step is skipped;
        raises, before anything is touched, when it must be refused."""
        host = self.host
        if host.on_nonfinite == "ignore" or not work:
            return work
        lrs = [group["lr"] for group in host.param_groups if isinstance(group["lr"], torch.Tensor)]
        return host.verdict(work, largest_entries([g for _, _, g in work], lrs))

    def begin(self) -> None:
        """A step that was not refused starts stepping its buckets."""

    def move(self, bucket: Bucket, update: torch.Tensor) -> None:
        """Decay and ``W ← W − η U`` for the members of ``bucket`` (``update``: ``(B, *view)``)."""
        move(bucket.group, [(bucket.params, update, bucket.layout)])

    def refresh(self, bucket: Bucket, k: int, due: list[int], refresh_index: int) -> bool:
        """A refresh of mode ``k`` due for the members ``due`` of ``bucket``: True if the runtime runs and installs
        it itself (False: the engine computes it here, through the refresh schedule)."""
        return False

    def finish(self) -> None:
        """Every bucket was stepped (not called when a step fails half-way)."""

    def end(self) -> None:
        """The step is over, whether it finished or failed."""

    def stats(self, counts: dict[str, int]) -> dict[str, int]:
        """The fallback counts to report, from this process's ``counts``."""
        return counts


class SingleProcess(Runtime):
    """One process (the default): the moves of a step are held back and made together at its end, one
    ``torch._foreach_*`` call per param group and operation (``precond.moves.PendingMoves``)."""

    def __init__(self, config: Any, host: Host) -> None:
        super().__init__(config, host)
        self.pending: Optional[PendingMoves] = None

    def begin(self) -> None:
        self.pending = PendingMoves()

    def move(self, bucket: Bucket, update: torch.Tensor) -> None:
        if self.pending is None:  # outside a step
            super().move(bucket, update)
        else:
            self.pending.add(bucket.group, bucket.params, update, bucket.layout)

    def end(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.flush()
