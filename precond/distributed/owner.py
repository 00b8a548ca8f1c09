"""Owner mode (update-parallel, ZeRO-1-like): each parameter's whole update is computed on one rank.

Every parameter gets an owner rank (``owners.balance`` on Eq. (1) of ``owners.py``). Only the owner keeps that
parameter's state (factors, spectra, bases, momentum, the applier's tensors) and computes its update ``U`` (before
``lr`` and weight decay). The owners' updates are exchanged in flat slots, one collective per chunk (in
``comm_dtype``): rank ``r``'s slot holds, for each parameter of the chunk it owns, a flag (1 = it has an update this
step) and then the updates, grouped by (param group, shape, dtype) so that each run is one batched view. Then every
rank applies the same decay and ``W ← W − η U`` to every parameter (``precond.moves.move``, the single-process
arithmetic), so all ranks stay bitwise equal to each other and, with ``comm_dtype`` equal to the state dtype, to one
process.

Chunks follow the order in which a rank steps its buckets: parameters of one kind (param group, layout, dtype:
what stacks into one bucket) are kept together, kinds in the order of their first parameter, and a chunk ends at a
kind boundary once it holds ``PIPELINE_ELEMENTS`` entries (or at ``chunk_elements``). A chunk's collective is
started as soon as this rank has staged every update it will put in it (and every earlier chunk has started), so the
exchange of the first kinds runs on the communication stream while the later kinds are still computed; the chunks
not started by then start at the end of the step, and the parameters move once all have arrived. Flags are written
on the device, so starting a chunk never waits for the device.

The slot sizes depend only on the parameter list, never on which gradients are present, so every rank issues the
same collectives in the same order, including a rank that owns nothing or whose parameters have no gradient.
"""

from __future__ import annotations

import attrs
import torch

from precond import moves
from precond.distributed.exchange import FlatExchange
from precond.distributed.owners import owner_plan
from precond.distributed.runtime import DistributedRuntime, Entry, Work

PIPELINE_ELEMENTS = 2**20
"""Entries from which a chunk may end at a kind boundary: smaller kinds share a collective (a collective costs a
launch and a latency, ~10–50 µs); larger ones each get theirs and are exchanged while later kinds compute."""


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


class OwnerRuntime(DistributedRuntime):
    """See the module docstring."""

    def _plan(self) -> None:
        previous = getattr(self, "_owner_of_param", {})  # a re-plan (add_param_group) keeps the owners it had
        self.owner = owner_plan(self.entries, self.world,
                                {e.index: previous[id(e.param)] for e in self.entries if id(e.param) in previous},
                                self.config.placement)
        self._owner_of_param = {id(e.param): rank for e, rank in zip(self.entries, self.owner, strict=True)}
        self.chunks: list[Chunk] = []
        self.chunk_of: dict[int, int] = {}
        members: list[Entry] = []
        filled = 0
        self._kind_position: dict[tuple, int] = {}
        for e in self.entries:
            self._kind_position.setdefault(self._kind(e), e.index)
        for e in sorted(self.entries, key=self._chunk_order):
            if members and (filled + e.layout.numel > self.config.chunk_elements
                            or self._chunk_order(e)[0] != self._chunk_order(members[-1])[0]
                            or self._ends_chunk(members, filled, e)):
                self._add_chunk(members)
                members, filled = [], 0
            members.append(e)
            filled += e.layout.numel
        if members:
            self._add_chunk(members)
        self._exchanges: dict[int, FlatExchange] = {}
        self._waiting: list[int] = []
        self._started = 0

    @staticmethod
    def _kind(entry: Entry) -> tuple:
        """What stacks into one bucket: the parameters of one kind are stepped together."""
        return (entry.group_index, entry.layout, entry.param.dtype)

    def _chunk_order(self, entry: Entry) -> tuple:
        """Chunks are cut in this order, and a new one starts where its first item changes: kinds in the order of
        their first parameter (the order of the optimizer's buckets), parameters in order within a kind."""
        return (0, self._kind_position[self._kind(entry)], entry.index)

    def _ends_chunk(self, members: list[Entry], filled: int, entry: Entry) -> bool:
        """Whether ``entry`` starts a new chunk at a kind boundary (see the module docstring)."""
        return filled >= PIPELINE_ELEMENTS and self._kind(entry) != self._kind(members[-1])

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
    def reset(self) -> None:
        self._drop_foreign_state()
        self._exchanges, self._waiting, self._started = {}, [], 0

    def gradients(self, work: Work) -> Work | None:
        """The base verdict, then how many updates this rank will stage in each chunk (those it steps)."""
        mine = super().gradients(work)
        self._waiting = [0] * len(self.chunks)
        for _, p, _ in mine or []:
            self._waiting[self.chunk_of[self.index[id(p)]]] += 1
        return mine

    def _drop_foreign_state(self) -> None:
        """State of a parameter another rank owns (e.g. after ``load_state_dict`` of a full single-process
        checkpoint) is dropped: each rank keeps only its own."""
        dropped = False
        state = self.host.state
        for e in self.entries:
            if not self.mine(e) and state.get(e.param):
                state[e.param] = {}
                dropped = True
        if dropped:
            self.host.forget_buckets()

    def _exchange(self, c: int) -> FlatExchange:
        if c not in self._exchanges:
            exchange = FlatExchange(self.chunks[c].sizes, self.config.comm_dtype, self.device, self.group, self.rank)
            exchange.own()[:self._flag_count(c, self.rank)].zero_()
            self._exchanges[c] = exchange
        return self._exchanges[c]

    def _flag_count(self, c: int, rank: int) -> int:
        """Flags at the head of ``rank``'s slot of chunk ``c``: one per parameter of the chunk it owns."""
        return sum(len(run.entries) for run in self.chunks[c].runs[rank])

    def move(self, bucket, update: torch.Tensor) -> None:
        """Copy the owner's update of each member of ``bucket`` into its place in this rank's slot, set its flag,
        and start every chunk that is now complete (the parameters move at :meth:`finish`)."""
        places = []
        for p in bucket.params:
            index = self.index[id(p)]
            c = self.chunk_of[index]
            if c < self._started:
                raise RuntimeError(f"internal error: an update of {self.host.name(p)} arrived after its chunk's "
                                   "exchange started (precond.distributed.owner)")
            flag, offset = self.chunks[c].where[index]
            places.append((c, flag, offset))
        numel = bucket.layout.numel
        first_c, first_flag, first = places[0]
        if all(c == first_c and o == first + i * numel and f == first_flag + i
               for i, (c, f, o) in enumerate(places)):
            slot = self._exchange(first_c).own()
            slot[first:first + len(places) * numel].view(update.shape).copy_(update)
            slot[first_flag:first_flag + len(places)].fill_(1.0)
        else:
            for (c, flag, offset), u in zip(places, update.unbind(0), strict=True):
                slot = self._exchange(c).own()
                slot[offset:offset + numel].view(u.shape).copy_(u)
                slot[flag:flag + 1].fill_(1.0)
        for c, _, _ in places:
            self._waiting[c] -= 1
        self._start_ready()

    def _start_ready(self, everything: bool = False) -> None:
        """Start the chunks, in order, whose updates from this rank are all staged (all of them at the end)."""
        while self._started < len(self.chunks) and (everything or self._waiting[self._started] <= 0):
            exchange = self._exchange(self._started)
            exchange.start()
            self.record(*exchange.elements_moved, exchange.dtype)
            self.traffic["early_collectives"] += not everything
            self._started += 1

    def finish(self) -> None:
        """Start the chunks not started yet, then move every parameter whose owner had an update."""
        self._start_ready(everything=True)
        for c in range(len(self.chunks)):
            slots = self._exchanges[c].wait()
            counts = [self._flag_count(c, rank) for rank in range(self.world)]
            heads = [slot[:n] for slot, n in zip(slots, counts, strict=True)]
            present = torch.cat(heads).tolist() if sum(counts) else []
            base = 0
            for rank, (slot, runs) in enumerate(zip(slots, self.chunks[c].runs, strict=True)):
                for run in runs:
                    self._apply_run(slot, run, present[base + run.flag:base + run.flag + len(run.entries)])
                base += counts[rank]
        self._exchanges, self._waiting, self._started = {}, [], 0

    def _apply_run(self, slot: torch.Tensor, run: Run, present: list[float]) -> None:
        layout = run.entries[0].layout
        updates = slot[run.start:run.start + len(run.entries) * run.size].view(len(run.entries), *layout.view_shape)
        chosen = [i for i, flag in enumerate(present) if flag == 1.0]
        if not chosen:
            return
        if len(chosen) < len(run.entries):
            updates = updates[chosen]
        params = [run.entries[i].param for i in chosen]
        moves.move(run.entries[0].group, [(params, updates.to(self.host.state_dtype), layout)])
