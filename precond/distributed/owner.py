"""Owner mode (update-parallel, ZeRO-1-like): each parameter's whole update is computed on one rank.

Every parameter gets an owner rank (``owners.balance`` on Eq. (1) of ``owners.py``). Only the owner keeps that
parameter's state (factors, spectra, bases, momentum, the applier's tensors) and computes its update ``U`` (before
``lr`` and weight decay). At the end of the step the owners' updates are exchanged in flat slots (one collective per
chunk of about ``chunk_elements`` parameter entries, in ``comm_dtype``): rank ``r``'s slot holds, for each
parameter it owns, a flag (1 = it has an update this step) and then the updates, grouped by (param group, shape,
dtype) so that each run is one batched view. Then every rank applies the same decay and ``W ← W − η U`` to every
parameter (``Optimizer._apply``, the single-process arithmetic), so all ranks stay bitwise equal to each other and,
with ``comm_dtype`` equal to the state dtype, to one process.

The slot sizes depend only on the parameter list, never on which gradients are present, so every rank issues the
same collectives in the same order, including a rank that owns nothing or whose parameters have no gradient.
"""

from __future__ import annotations

import attrs
import torch

from precond.distributed.exchange import FlatExchange
from precond.distributed.owners import owner_plan
from precond.distributed.runtime import Entry, Runtime


@attrs.define
class Run:
    """Consecutive updates in one rank's slot of one (param group, shape, dtype): one batched view."""

    entries: list[Entry]
    flag: int
    """Position of the first member's flag in the slot."""
    start: int
    """Offset of the first member's update in the slot."""
    size: int
    """Slot elements of each member (its numel here; padded rows of a shard in FSDP2 mode)."""


@attrs.define
class Chunk:
    """A set of parameters exchanged by one collective: per rank its runs and its slot size."""

    runs: list[list[Run]]
    sizes: list[int]
    where: dict[int, tuple[int, int]] = attrs.field(factory=dict)
    """Entry index → (flag position, update offset) in its owner's slot."""


class OwnerRuntime(Runtime):
    """See the module docstring."""

    def _plan(self, optimizer) -> None:
        previous = getattr(self, "_owner_of_param", {})  # a re-plan (add_param_group) keeps the owners it had
        self.owner = owner_plan(self.entries, self.world,
                                {e.index: previous[id(e.param)] for e in self.entries if id(e.param) in previous},
                                self.config.placement)
        self._owner_of_param = {id(e.param): rank for e, rank in zip(self.entries, self.owner)}
        self.chunks: list[Chunk] = []
        self.chunk_of: dict[int, int] = {}
        members: list[Entry] = []
        filled = 0
        for e in sorted(self.entries, key=self._chunk_order):
            if members and (filled + e.layout.numel > self.config.chunk_elements
                            or self._chunk_order(e)[0] != self._chunk_order(members[-1])[0]):
                self._add_chunk(members)
                members, filled = [], 0
            members.append(e)
            filled += e.layout.numel
        if members:
            self._add_chunk(members)
        self._exchanges: dict[int, FlatExchange] = {}
        self._flags: dict[int, list[float]] = {}

    def _chunk_order(self, entry: Entry) -> tuple:
        """Chunks are cut in this order, and a new one starts where its first item changes."""
        return (0, entry.index)

    def _slot_size(self, entry: Entry) -> int:
        """Slot elements of one parameter's update."""
        return entry.layout.numel

    def _add_chunk(self, members: list[Entry]) -> None:
        runs: list[list[Run]] = []
        sizes = []
        chunk = Chunk(runs, sizes)
        for rank in range(self.world):
            owned = sorted((e for e in members if self.owner[e.index] == rank),
                           key=lambda e: (e.group_index, e.layout.shape, str(e.param.dtype), e.index))
            offset = len(owned)
            rank_runs: list[Run] = []
            for position, e in enumerate(owned):
                key = (e.group_index, e.layout.shape, e.param.dtype)
                last = rank_runs[-1] if rank_runs else None
                if last is not None and (last.entries[0].group_index, last.entries[0].layout.shape,
                                         last.entries[0].param.dtype) == key:
                    last.entries.append(e)
                else:
                    rank_runs.append(Run([e], position, offset, self._slot_size(e)))
                chunk.where[e.index] = (position, offset)
                offset += self._slot_size(e)
            runs.append(rank_runs)
            sizes.append(offset)
        for e in members:
            self.chunk_of[e.index] = len(self.chunks)
        self.chunks.append(chunk)

    def mine(self, entry: Entry) -> bool:
        return self.owner[entry.index] == self.rank

    def owner_of(self, p: torch.Tensor) -> int:
        return self.owner[self.index[id(p)]]

    # --- the step ------------------------------------------------------------------------------------
    def begin(self, optimizer) -> None:
        self._drop_foreign_state(optimizer)
        self._exchanges, self._flags = {}, {}

    def _drop_foreign_state(self, optimizer) -> None:
        """State of a parameter another rank owns (e.g. after ``load_state_dict`` of a full single-process
        checkpoint) is dropped: each rank keeps only its own."""
        dropped = False
        for e in self.entries:
            if not self.mine(e) and optimizer.state.get(e.param):
                optimizer.state[e.param] = {}
                dropped = True
        if dropped:
            optimizer._buckets.invalidate()

    def _exchange(self, c: int) -> FlatExchange:
        if c not in self._exchanges:
            self._exchanges[c] = FlatExchange(self.chunks[c].sizes, self.config.comm_dtype, self.device,
                                              self.group, self.rank)
            self._flags[c] = [0.0] * sum(len(run.entries) for run in self.chunks[c].runs[self.rank])
        return self._exchanges[c]

    def stage(self, optimizer, bucket, update: torch.Tensor) -> bool:
        """Copy the owner's update of each member of ``bucket`` into its place in this rank's slot."""
        places = []
        for p in bucket.params:
            index = self.index[id(p)]
            c = self.chunk_of[index]
            flag, offset = self.chunks[c].where[index]
            places.append((c, flag, offset))
        numel = bucket.layout.numel
        first_c, _, first = places[0]
        if all(c == first_c and o == first + i * numel for i, (c, _, o) in enumerate(places)):
            slot = self._exchange(first_c).own()
            slot[first:first + len(places) * numel].view(update.shape).copy_(update)
        else:
            for (c, _, offset), u in zip(places, update.unbind(0)):
                self._exchange(c).own()[offset:offset + numel].view(u.shape).copy_(u)
        for c, flag, _ in places:
            self._flags[c][flag] = 1.0
        return True

    def finish(self, optimizer) -> None:
        """Exchange every chunk's slots (all launched before the first is waited for), then move every parameter
        whose owner had an update."""
        exchanges = [self._exchange(c) for c in range(len(self.chunks))]
        for c, exchange in enumerate(exchanges):
            flags = self._flags[c]
            if flags:
                exchange.own()[:len(flags)].copy_(torch.tensor(flags, dtype=exchange.dtype))
            exchange.start()
            self.record(*exchange.elements_moved, exchange.dtype)
        for c, exchange in enumerate(exchanges):
            slots = exchange.wait()
            counts = [sum(len(run.entries) for run in runs) for runs in self.chunks[c].runs]
            present = torch.cat([slot[:n] for slot, n in zip(slots, counts)]).tolist() if sum(counts) else []
            base = 0
            for rank, (slot, runs) in enumerate(zip(slots, self.chunks[c].runs)):
                for run in runs:
                    self._apply_run(optimizer, slot, run, present[base + run.flag:base + run.flag + len(run.entries)])
                base += counts[rank]
        self._exchanges, self._flags = {}, {}

    @staticmethod
    def _apply_run(optimizer, slot: torch.Tensor, run: Run, present: list[float]) -> None:
        layout = run.entries[0].layout
        updates = slot[run.start:run.start + len(run.entries) * run.size].view(len(run.entries), *layout.view_shape)
        chosen = [i for i, flag in enumerate(present) if flag == 1.0]
        if not chosen:
            return
        if len(chosen) < len(run.entries):
            updates = updates[chosen]
        params = [run.entries[i].param for i in chosen]
        optimizer._apply(run.entries[0].group, params, updates.to(optimizer.state_dtype), layout)
