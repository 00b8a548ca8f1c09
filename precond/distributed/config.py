"""``DataParallel``: the optional fifth part of a ``precond.Optimizer`` that spreads its work over ranks."""

from __future__ import annotations

from typing import Any, Literal

import attrs
import torch

from precond.validators import number, one_of

COMM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _comm_dtype(instance: Any, attribute: Any, value: Any) -> None:
    if value not in COMM_DTYPES:
        raise ValueError(f"comm_dtype (the dtype the updates travel in) must be one of "
                         f"{', '.join(map(str, COMM_DTYPES))}, got {value!r}")


@attrs.frozen(eq=False)
class DataParallel:
    """Data-parallel training with the preconditioner's work and state spread over the ranks of ``group``.

    It never changes the math: with ``comm_dtype`` equal to the optimizer's ``state_dtype`` every rank's parameters
    equal those of one process stepping the same (averaged) gradients (``docs/scaling.md``). Gradients must already
    be averaged over the ranks (DDP does that), as for any optimizer.

    - ``mode="owner"`` (default; update-parallel, ZeRO-1-like): each parameter has one owner rank, chosen by a
      greedy balance of estimated cost; only the owner keeps its state and computes its update; the updates are
      all-gathered chunk by chunk as the owners finish them (in ``comm_dtype``; bfloat16 halves the bytes and rounds
      the update to 8 bits of mantissa) and every rank applies weight decay and the update. State memory and
      compute ÷ ``W``. Each rank's
      ``state_dict()`` holds only the parameters it owns (``{}`` for the others): checkpoint with
      ``torch.distributed.checkpoint`` (``precond.distributed.checkpoint``), which saves every owner's share
      and loads at any world size.
    - ``mode="replicate"``: full state on every rank; only the basis refreshes are spread over the ranks (using the
      stagger plan's offsets, so each refresh step's work is split) and their results broadcast in the state dtype
      (``comm_dtype`` is not used). Saves refresh time, not memory; checkpoints as in one process.

    ``placement`` (owner mode): ``"balanced"`` (default) spreads every kind of parameter (param group, shape,
    dtype) over the ranks for the best balance of work and state; ``"by_kind"`` keeps each kind on as few ranks as
    the balance allows, so each rank has fewer buckets and launches fewer kernels per step (for launch-bound steps;
    ``precond.distributed.owners``). The updates are the same either way.

    ``group``: the process group (None: the default group). ``chunk_elements``: owner mode exchanges the updates
    in one collective per chunk of at most about this many parameter entries (bounding the transient buffers;
    chunks also end between kinds of parameters, so that each starts while later kinds are computed).
    ``torch.distributed`` must be initialised before the optimizer is built.
    """

    mode: Literal["owner", "replicate"] = attrs.field(
        default="owner", validator=one_of(("owner", "replicate")))
    group: Any | None = None
    placement: Literal["balanced", "by_kind"] = attrs.field(
        default="balanced", validator=one_of(("balanced", "by_kind")))
    comm_dtype: torch.dtype = attrs.field(default=torch.float32, validator=_comm_dtype)
    chunk_elements: int = attrs.field(default=2**27, validator=number(
        low=1, integer=True, meaning="parameter entries per exchange collective"))

    def __attrs_post_init__(self) -> None:
        from precond import compatibility

        compatibility.check(compatibility.parallel_features(self.mode, self.placement))
