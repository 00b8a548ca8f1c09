"""FSDP2 exact owner mode: parameters are DTensors sharded by rows (``Shard(0)`` on a 1-D mesh).

Each parameter has one owner (as in ``owner.py``). Per chunk of parameters (one dtype, about ``chunk_elements``
entries) and per step:

1. one ``all_to_all`` brings every rank's gradient rows of parameter ``i`` to its owner. A row shard is padded to
   ``c_i = ⌈m_i / W⌉`` rows (the size ``torch.chunk`` and DTensor give the first shards; later ranks may hold fewer
   or none), so rank ``r`` sends the same ``Σ_{i owned by d} (1 + c_i·row_i)`` elements to each rank ``d``: a flag
   (1 = it has a gradient) per parameter, then the padded rows. The owner concatenates the unpadded rows into the
   full gradient;
2. the owner steps the full parameter with the unchanged single-process code (state, refreshes, the update
   ``U``), so its state is that of one process;
3. one ``all_to_all`` (in ``comm_dtype``) sends each rank its rows of ``U`` (padded alike, a flag per
   parameter), and every rank applies weight decay and ``W ← W − η U`` to its local shard with the single-process
   arithmetic (``precond.moves.move``), so every shard is bitwise what one process would hold.

Per step each rank sends and receives about ``2·numel·(W−1)/W`` elements (gradients in their dtype, updates in
``comm_dtype``), like a DDP all-reduce; state and preconditioner work ÷ ``W``. A parameter is counted as having a
gradient when every rank holding rows of it has one (FSDP2 gives all or none). Only ``Shard(0)`` on a
one-dimensional mesh whose ranks are DataParallel's group is handled; other DTensors (tensor parallel, ``Shard(1)``,
HSDP's 2-D mesh: pass its shard sub-mesh's parameters instead) and a mix of DTensors and plain tensors are refused.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from precond import moves
from precond.distributed.owner import OwnerRuntime
from precond.distributed.runtime import Entry, Work


class _Rows:
    """A layout whose ``unview`` is the identity: the updates applied to a local shard are already shard-shaped."""

    @staticmethod
    def unview(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _all_to_all(output: torch.Tensor, input: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    return dist.all_to_all_single(output, input, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=True)


class ShardedOwnerRuntime(OwnerRuntime):
    """See the module docstring."""

    def _check_parameters(self, entries: list[Entry]) -> None:
        from torch.distributed.tensor import DTensor, Shard

        group_ranks = dist.get_process_group_ranks(self.group or dist.group.WORLD)
        for e in entries:
            p, name = e.param, self.host.name(e.param)
            if not isinstance(p, DTensor):
                raise TypeError(f"parameter {name} is a plain tensor while others are DTensors; precond.DataParallel "
                                "steps either all-DTensor (FSDP2, Shard(0)) or all-plain (DDP) parameters")
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise TypeError(f"parameter {name} is a DTensor placed {tuple(p.placements)} on a "
                                f"{p.device_mesh.ndim}-D mesh; precond.DataParallel handles FSDP2's Shard(0) on a 1-D "
                                "mesh only (for HSDP give it the shard dimension's group; tensor parallel is not "
                                "supported)")
            if dist.get_process_group_ranks(p.device_mesh.get_group()) != group_ranks:
                raise ValueError(f"parameter {name} is sharded over ranks "
                                 f"{dist.get_process_group_ranks(p.device_mesh.get_group())}, but DataParallel's group "
                                 f"is {group_ranks}; pass group=mesh.get_group()")
            if p.ndim == 0 or p.to_local().shape[0] != self.rows(e, self.rank):
                raise TypeError(f"parameter {name}'s local shard has {p.to_local().shape[0] if p.ndim else 0} "
                                f"rows, not the {self.rows(e, self.rank)} of an even Shard(0) split "
                                "(⌈m/W⌉ rows per rank)")

    # --- geometry of one parameter ---------------------------------------------------------------------
    def chunk_rows(self, e: Entry) -> int:
        """``c = ⌈m / W⌉``: the rows of a padded shard."""
        return math.ceil(e.layout.shape[0] / self.world) if e.layout.shape else 0

    def rows(self, e: Entry, rank: int) -> int:
        """Rows rank ``rank`` holds: ``max(0, min(c, m − rank·c))``."""
        if not e.layout.shape:
            return 0
        c = self.chunk_rows(e)
        return max(0, min(c, e.layout.shape[0] - rank * c))

    @staticmethod
    def row_numel(e: Entry) -> int:
        return e.layout.numel // e.layout.shape[0] if e.layout.shape and e.layout.shape[0] else 0

    def _slot_size(self, e: Entry) -> int:
        return self.chunk_rows(e) * self.row_numel(e)

    def _chunk_order(self, e: Entry) -> tuple:
        return (str(e.param.dtype), e.index)

    def _ends_chunk(self, members: list[Entry], filled: int, entry: Entry) -> bool:
        return False  # one exchange at the end of the step, cut by dtype and size only

    def reset(self) -> None:
        super().reset()
        self._flags: dict[int, list[float]] = {}

    # --- 1. gradients to their owners ----------------------------------------------------------------------
    def select(self, work: Work) -> Work:
        grads = {id(p): grad for _, p, grad in work}
        pending = []
        for chunk in self.chunks:
            members = [e for runs in chunk.runs for run in runs for e in run.entries]
            dtype = members[0].param.dtype
            blocks = [len(self._owned(chunk, d)) + sum(run.size * len(run.entries) for run in chunk.runs[d])
                      for d in range(self.world)]
            send = torch.zeros(sum(blocks), dtype=dtype, device=self.device)
            start = 0
            for d in range(self.world):
                for position, e in enumerate(self._owned(chunk, d)):
                    grad = grads.get(id(e.param))
                    if grad is None:
                        continue
                    send[start + position] = 1
                    local = grad.to_local()
                    _, offset = chunk.where[e.index]
                    send[start + offset:start + offset + local.numel()].copy_(local.reshape(-1))
                start += blocks[d]
            receive = torch.empty(self.world * blocks[self.rank], dtype=dtype, device=self.device)
            handle = _all_to_all(receive, send, [blocks[self.rank]] * self.world, blocks, self.group)
            self.record(sum(blocks) - blocks[self.rank], (self.world - 1) * blocks[self.rank], dtype)
            pending.append((chunk, blocks[self.rank], receive, handle))
        mine = {}
        for chunk, block, receive, handle in pending:
            handle.wait()
            owned = self._owned(chunk, self.rank)
            if not owned:
                continue
            pieces = receive.view(self.world, block)
            flags = pieces[:, :len(owned)].tolist()
            for position, e in enumerate(owned):
                if not all(flags[r][position] == 1 for r in range(self.world) if self.rows(e, r)):
                    continue
                _, offset = chunk.where[e.index]
                rest = e.layout.shape[1:]
                shards = [pieces[r, offset:offset + self.rows(e, r) * self.row_numel(e)].view(self.rows(e, r), *rest)
                          for r in range(self.world)]
                mine[e.index] = torch.cat(shards)
        return [(e.group, e.param, mine[e.index]) for e in self.entries if e.index in mine]

    def _owned(self, chunk, rank: int) -> list[Entry]:
        return [e for run in chunk.runs[rank] for e in run.entries]

    # --- 3. rows of the updates back ---------------------------------------------------------------------
    def move(self, bucket, update: torch.Tensor) -> None:
        """Split the owner's full update of each member of ``bucket`` into the padded row blocks of its ranks."""
        for p, u in zip(bucket.params, update.unbind(0), strict=True):
            e = self.entries[self.index[id(p)]]
            c = self.chunk_of[e.index]
            chunk = self.chunks[c]
            position, offset = chunk.where[e.index]
            send = self._send(c)
            block = send.numel() // self.world
            full = e.layout.unview(u).reshape(e.layout.shape[0], -1) if e.layout.shape else u.reshape(1, -1)
            step = self.chunk_rows(e)
            for r in range(self.world):
                n = self.rows(e, r)
                if n:
                    send[r * block + offset:r * block + offset + n * self.row_numel(e)].copy_(
                        full[r * step:r * step + n].reshape(-1))
            self._flags[c][position] = 1.0

    def _send(self, c: int) -> torch.Tensor:
        if c not in self._exchanges:
            chunk = self.chunks[c]
            block = len(self._owned(chunk, self.rank)) + sum(run.size * len(run.entries)
                                                             for run in chunk.runs[self.rank])
            self._exchanges[c] = torch.zeros(self.world * block, dtype=self.config.comm_dtype, device=self.device)
            self._flags[c] = [0.0] * len(self._owned(chunk, self.rank))
        return self._exchanges[c]

    def finish(self) -> None:
        pending = []
        for c, chunk in enumerate(self.chunks):
            send = self._send(c)
            flags = self._flags[c]
            blocks = [len(self._owned(chunk, o)) + sum(run.size * len(run.entries) for run in chunk.runs[o])
                      for o in range(self.world)]
            if flags:
                send.view(self.world, -1)[:, :len(flags)] = torch.tensor(flags, dtype=send.dtype)
            receive = torch.empty(sum(blocks), dtype=send.dtype, device=self.device)
            handle = _all_to_all(receive, send, blocks, [blocks[self.rank]] * self.world, self.group)
            self.record(send.numel() - blocks[self.rank], sum(blocks) - blocks[self.rank], send.dtype)
            pending.append((chunk, blocks, receive, handle))
        for chunk, blocks, receive, handle in pending:
            handle.wait()
            start = 0
            for o in range(self.world):
                piece = receive[start:start + blocks[o]]
                start += blocks[o]
                owned = self._owned(chunk, o)
                if not owned:
                    continue
                present = piece[:len(owned)].tolist()
                for run in chunk.runs[o]:
                    self._apply_shards(piece, run, present[run.flag:run.flag + len(run.entries)])
        self._exchanges, self._flags = {}, {}

    def _apply_shards(self, piece: torch.Tensor, run, present: list[float]) -> None:
        e0 = run.entries[0]
        n = self.rows(e0, self.rank)
        chosen = [i for i, flag in enumerate(present) if flag == 1.0]
        if not chosen or not n:
            return
        rest = e0.layout.shape[1:]
        updates = piece[run.start:run.start + len(run.entries) * run.size].view(len(run.entries), -1)
        updates = updates[:, :n * self.row_numel(e0)].reshape(len(run.entries), n, *rest)
        if len(chosen) < len(run.entries):
            updates = updates[chosen]
        shards = [run.entries[i].param.to_local() for i in chosen]
        moves.move(e0.group, [(shards, updates.to(self.host.state_dtype), _Rows)])
