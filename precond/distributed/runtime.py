"""What the distributed modes share: the parameter list in a fixed order, the finiteness verdict agreed by every
rank, and the fallback counters summed over ranks.

A distributed runtime is a ``precond.runtime.Runtime`` (the interface the optimizer's engine talks to, chosen by
``precond.compatibility.RUNTIMES``): :meth:`DistributedRuntime.gradients` (which gradients this rank steps, after one
all-reduce of the largest ``|g|``), ``move`` (an update this rank computed), ``refresh`` (a due basis refresh) and
``finish`` (end of the step). It reads the engine through ``precond.runtime.Host`` only.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
import torch.distributed as dist

from precond.layout import Layout
from precond.runtime import Host, Runtime

Work = list[tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]]


@attrs.frozen
class Entry:
    """One parameter in the fixed order every rank agrees on (groups in order, parameters in group order)."""

    index: int
    group_index: int
    group: dict[str, Any] = attrs.field(eq=False, repr=False)
    param: torch.Tensor = attrs.field(eq=False, repr=False)
    layout: Layout

    @property
    def preconditioner(self):
        return self.group["preconditioner"]


def is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)


def entries_of(optimizer) -> list[Entry]:
    """Every parameter of ``optimizer`` (anything with ``param_groups``) in the fixed order, with its layout."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            out.append(Entry(len(out), gi, group, p, group["preconditioner"].plan(p.shape)))
    return out


def signature(optimizer) -> tuple:
    """What the plans depend on: changes (``add_param_group``) make them be recomputed."""
    return tuple((gi, id(p), tuple(p.shape), p.dtype, id(group["preconditioner"]))
                 for gi, group in enumerate(optimizer.param_groups) for p in group["params"])


class DistributedRuntime(Runtime):
    """Base of the owner and replicate runtimes (see the module docstring)."""

    shares_refreshes = False
    replicated_rungs: frozenset[str] = frozenset({"nonfinite_skipped"})

    def __init__(self, config, host: Host) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("precond.DataParallel needs torch.distributed.init_process_group(...) to have been "
                               "called before the optimizer is built (torchrun sets up the environment for it)")
        super().__init__(config, host)
        self.group = config.group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of DataParallel's process group")
        self._signature: tuple | None = None
        self.entries: list[Entry] = []
        self.index: dict[int, int] = {}
        self.device: torch.device | None = None
        self.traffic = new_traffic()
        self.prepare()  # refuses parameters it cannot handle now, not at the first step

    # --- the plan ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """(Re)compute the entries and this mode's plan when the parameters changed."""
        sig = signature(self.host)
        if sig == self._signature:
            return
        entries = entries_of(self.host)
        self._check_parameters(entries)
        devices = {e.param.device for e in entries}
        if len(devices) > 1:
            raise ValueError("precond.DataParallel needs every parameter of a rank on one device, "
                             f"got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.entries = entries
        self.index = {id(e.param): e.index for e in entries}
        self._plan()
        self._signature = sig

    def _check_parameters(self, entries: list[Entry]) -> None:
        for e in entries:
            if is_dtensor(e.param):
                raise TypeError(f"parameter {self.host.name(e.param)} is a DTensor (FSDP2 / tensor parallel) among "
                                f"plain tensors, or in {type(self.config).__name__}(mode={self.config.mode!r}), which "
                                "steps plain tensors replicated on every rank (DDP); FSDP2 (fully_shard) parameters "
                                "sharded Shard(0) take mode='owner' with every parameter a DTensor")

    def _plan(self) -> None:
        raise NotImplementedError

    def mine(self, entry: Entry) -> bool:
        """Whether this rank computes the update of ``entry`` (all parameters in replicate mode)."""
        return True

    # --- the step ------------------------------------------------------------------------------------
    def gradients(self, work: Work) -> Work | None:
        """The ``(group, p, grad)`` this rank steps, after the verdict on every rank's gradients (one all-reduce of
        the largest ``|g|`` per parameter and of the tensor learning rates; NaN/Inf are sent as +inf so the max
        keeps them). None when all ranks skip the step; raises on every rank when it must be refused."""
        host = self.host
        self.prepare()
        self.traffic = new_traffic()
        self.reset()
        for e in self.entries:  # every rank lists every parameter (empty where it keeps no state): see checkpoint.py
            host.state[e.param]
        mine = self.select(work)
        if host.on_nonfinite == "ignore":
            return mine
        lrs = [group["lr"] for group in host.param_groups if isinstance(group["lr"], torch.Tensor)]
        values = torch.zeros(len(self.entries) + len(lrs), dtype=torch.float64, device=self.device)
        if mine:
            maxima = torch._foreach_norm([g for _, _, g in mine], float("inf"))
            index = torch.tensor([self.index[id(p)] for _, p, _ in mine], device=self.device)
            values.index_copy_(0, index, torch.stack([m.to(device=self.device, dtype=torch.float64) for m in maxima]))
        if lrs:
            values[len(self.entries):] = torch.stack(
                [lr.detach().reshape(()).to(device=self.device, dtype=torch.float64) for lr in lrs]
            )
        values = torch.where(torch.isnan(values), torch.full_like(values, math.inf), values)
        if self.world > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
            ring = 2 * (self.world - 1) * values.numel() // self.world  # a ring all-reduce's volume per rank
            self.record(ring, ring, values.dtype)
        owned = {id(p): grad for _, p, grad in mine}
        entries = [(e.group, e.param, owned.get(id(e.param))) for e in self.entries]
        return host.verdict(entries, values.tolist())

    def reset(self) -> None:
        """Start of a step (after the plan is up to date, before the verdict)."""

    def select(self, work: Work) -> Work:
        """The gradients this rank steps, in the fixed order: its own parameters' (all in replicate mode)."""
        grads = {id(p): grad for _, p, grad in work}
        return [(e.group, e.param, grads[id(e.param)]) for e in self.entries if id(e.param) in grads and self.mine(e)]

    # --- reporting -----------------------------------------------------------------------------------
    def stats(self, counts: dict[str, int]) -> dict[str, int]:
        """The fallback counts of the whole group (a collective: call it on every rank). Events that happen on one
        rank only are summed; those every rank counts alike (``replicated_rungs``) are taken once (max)."""
        if self.world == 1:
            return counts
        everyone: list[dict[str, int] | None] = [None] * self.world
        dist.all_gather_object(everyone, counts, group=self.group)
        out: dict[str, int] = {}
        for rank_counts in everyone:
            for rung, n in rank_counts.items():
                out[rung] = max(out.get(rung, 0), n) if rung in self.replicated_rungs else out.get(rung, 0) + n
        return out

    def record(self, sent: int, received: int, dtype: torch.dtype) -> None:
        """Count one collective of this step: elements this rank sends and receives (:func:`traffic`)."""
        size = torch.empty((), dtype=dtype).element_size()
        self.traffic["collectives"] += 1
        self.traffic["bytes_sent"] += sent * size
        self.traffic["bytes_received"] += received * size


def new_traffic() -> dict[str, int]:
    return {"collectives": 0, "early_collectives": 0, "bytes_sent": 0, "bytes_received": 0}
