"""Replicate mode (basis-broadcast, KAISA's COMM_OPT): full state on every rank, refreshes spread over ranks.

Every rank folds every gradient into its own full copy of the state and computes every update, exactly as one
process does. Only the basis refreshes (the ``d_k³`` work) are split: each refresh unit ``(parameter, mode)`` has
one rank that computes it (``owners.refresh_owners``: units due at the same steps, i.e. with the same stagger
offset, balanced by ``d_k³``). The refreshes due in a step are computed by their ranks right after that step's
fold, exchanged in one flat collective at the end of the step (in the state dtype: new bases, eigenvalues and
permutations, never rounded), and installed by every rank in the single-process order. Nothing reads a basis
between the fold and the end of the step, so the updates are those of one process (async refresh is not offered).

Every rank must see the same gradients (DDP averages them), so its buckets and refresh steps are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from precond.distributed.exchange import FlatExchange
from precond.distributed.owners import refresh_owners
from precond.distributed.runtime import DistributedRuntime
from precond.fallbacks import FallbackCounter
from precond.refresh import Refresh, rayleigh_quotients


@attrs.define(eq=False)
class _Pending:
    bucket: object
    k: int
    due: list[int]
    owners: list[int]
    d: int
    result: Refresh | None


def _block(d: int, m: int) -> int:
    """Slot entries of ``m`` refreshed ``d × d`` bases of one rank: two flags, the bases, eigenvalues, permutation."""
    return 2 + m * (d * d + 2 * d) if m else 0


class ReplicateRuntime(DistributedRuntime):
    """See the module docstring."""

    def __init__(self, config, host) -> None:
        super().__init__(config, host)  # async_refresh is refused at construction (precond.compatibility)
        self.counter = FallbackCounter()
        self.unit_owner: dict = {}
        self.pending: list[_Pending] = []

    def _plan(self) -> None:
        self.unit_owner = {}

    def _plan_units(self) -> None:
        host = self.host
        units = [(key, d, every, host.refresh_offset(key) or 0) for key, d, every in host.refresh_units()]
        self.unit_owner = refresh_owners(units, self.world)

    def reset(self) -> None:
        self.pending = []

    def refresh(self, bucket, k: int, due: Sequence[int], refresh_index: int) -> bool:
        keys = [(id(bucket.params[i]), k) for i in due]
        if any(key not in self.unit_owner for key in keys):
            self._plan_units()
        owners = [self.unit_owner[key] for key in keys]
        mine = [i for i, rank in zip(due, owners, strict=True) if rank == self.rank]
        result = None
        if mine:
            factor, basis = bucket.refresh_inputs(k, torch.tensor(mine, device=bucket.params[0].device))
            result = bucket.preconditioner.compute_refresh(factor, basis, self.counter, refresh_index)
        self.pending.append(_Pending(bucket, k, list(due), owners, bucket.layout.view_shape[k], result))
        return True

    def finish(self) -> None:
        if not self.pending:
            return
        dtype = self.host.state_dtype
        counts = [[item.owners.count(r) for r in range(self.world)] for item in self.pending]
        sizes = [sum(_block(item.d, m[r]) for item, m in zip(self.pending, counts, strict=True))
                 for r in range(self.world)]
        exchange = FlatExchange(sizes, dtype, self.device, self.group, self.rank)
        slot, offset = exchange.own(), 0
        for item, m in zip(self.pending, counts, strict=True):
            n, d = m[self.rank], item.d
            if not n:
                continue
            r = item.result
            slot[offset] = float(r.eigenvalues is not None)
            slot[offset + 1] = float(r.permutation is not None)
            body = slot[offset + 2:offset + _block(d, n)].view(n, d * d + 2 * d)
            body[:, :d * d].copy_(r.basis.reshape(n, d * d))
            body[:, d * d:d * d + d].copy_(r.eigenvalues if r.eigenvalues is not None else torch.zeros(n, d))
            body[:, d * d + d:].copy_(r.permutation if r.permutation is not None else torch.zeros(n, d))
            offset += _block(d, n)
        exchange.start()
        self.record(*exchange.elements_moved, dtype)
        slots = exchange.wait()
        starts = [0] * self.world
        blocks = []
        for item, m in zip(self.pending, counts, strict=True):
            here = []
            for r in range(self.world):
                here.append(slots[r][starts[r]:starts[r] + _block(item.d, m[r])])
                starts[r] += _block(item.d, m[r])
            blocks.append(here)
        flags = torch.cat([b[:2] for here in blocks for b in here if b.numel()]).tolist()
        position = 0
        for item, m, here in zip(self.pending, counts, blocks, strict=True):
            present = {}
            for r in range(self.world):
                if m[r]:
                    present[r] = (flags[position] == 1.0, flags[position + 1] == 1.0)
                    position += 2
            self._install(item, m, here, present)
        self.pending = []

    def _install(self, item: _Pending, m: list[int], here: list[torch.Tensor], present: dict) -> None:
        """Assemble the refresh of ``item``'s due entries (in due order) from the ranks' blocks and install it."""
        d, bucket = item.d, item.bucket
        ranks = [r for r in range(self.world) if m[r]]
        bodies = torch.cat([here[r][2:].view(m[r], d * d + 2 * d) for r in ranks])
        seen = {r: 0 for r in ranks}
        order = []
        start = {r: sum(m[q] for q in ranks if q < r) for r in ranks}
        for rank in item.owners:
            order.append(start[rank] + seen[rank])
            seen[rank] += 1
        bodies = bodies[torch.tensor(order, device=bodies.device)]
        basis = bodies[:, :d * d].reshape(-1, d, d)
        rows = torch.tensor([present[r][0] for r in item.owners], device=bodies.device)
        index = None if len(item.due) == len(bucket.params) else torch.tensor(item.due, device=bodies.device)
        eigenvalues = None
        if bool(rows.any()):
            eigenvalues = bodies[:, d * d:d * d + d]
            if not bool(rows.all()):  # a rank's refresh gave no eigenvalues: its columns' Rayleigh quotients
                factor, _ = bucket.refresh_inputs(item.k, index)
                eigenvalues = torch.where(rows[:, None], eigenvalues, rayleigh_quotients(factor, basis))
        permutation = None
        if any(present[r][1] for r in ranks):
            identity = torch.arange(d, device=bodies.device, dtype=bodies.dtype).expand(len(item.owners), d)
            moved = torch.tensor([present[r][1] for r in item.owners], device=bodies.device)[:, None]
            permutation = torch.where(moved, bodies[:, d * d + d:], identity).round().long()
        bucket.install_refresh(item.k, index, Refresh(basis=basis.contiguous(), eigenvalues=eigenvalues,
                                                      permutation=permutation))

    def stats(self, counts: dict[str, int]) -> dict[str, int]:
        """This rank's counts (every rank counts alike: the state is replicated) plus the refreshes' counts summed
        over the ranks that computed them (a collective)."""
        shared = super().stats(self.counter.as_dict())
        out = dict(counts)
        for rung, n in shared.items():
            out[rung] = out.get(rung, 0) + n
        return out

