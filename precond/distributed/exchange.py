"""One flat collective that gives every rank every rank's slot (sizes known to all ranks in advance).

Each rank fills its own slot, a flat tensor of ``sizes[rank]`` elements; after :meth:`FlatExchange.wait` every
rank holds all ``W`` slots. When the slots are about equal (padding ≤ 1/8 of the payload) this is one
``all_gather`` of slots padded to the largest; otherwise one ``broadcast`` per non-empty slot from its rank, so a
rank holding one huge parameter does not make every rank send that much. Which of the two is used depends only on
``sizes``, so every rank issues the same collectives in the same order, including ranks whose slot is empty. The
same code runs on gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

PADDING_ALLOWED = 0.125


def _all_gather(output: torch.Tensor, input: torch.Tensor, group, async_op: bool):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


class FlatExchange:
    """Slots of ``sizes[r]`` elements of ``dtype`` on ``device``, exchanged with one all-gather or ``W`` broadcasts."""

    def __init__(self, sizes: Sequence[int], dtype: torch.dtype, device: torch.device, group, rank: int) -> None:
        self.sizes = list(sizes)
        self.dtype, self.device, self.group, self.rank = dtype, device, group, rank
        self.world = len(self.sizes)
        self.largest = max(self.sizes, default=0)
        payload = sum(self.sizes)
        self.gathered = self.world * self.largest <= (1 + PADDING_ALLOWED) * payload
        self.offsets = [sum(self.sizes[:r]) for r in range(self.world)]
        self._buffer: torch.Tensor | None = None
        self._send: torch.Tensor | None = None
        self._handles: list = []

    @property
    def elements_moved(self) -> tuple[int, int]:
        """Elements this rank sends and receives (as the collective is issued, padding included)."""
        if self.gathered:
            return self.largest, (self.world - 1) * self.largest
        return self.sizes[self.rank], sum(self.sizes) - self.sizes[self.rank]

    def own(self) -> torch.Tensor:
        """This rank's slot, to be filled before :meth:`start` (allocated on first use)."""
        if self._buffer is None:
            if self.gathered:
                self._buffer = torch.empty(self.world * self.largest, dtype=self.dtype, device=self.device)
                self._send = torch.empty(self.largest, dtype=self.dtype, device=self.device)
            else:
                self._buffer = torch.empty(sum(self.sizes), dtype=self.dtype, device=self.device)
        if self.gathered:
            return self._send[:self.sizes[self.rank]]
        return self._buffer[self.offsets[self.rank]:self.offsets[self.rank] + self.sizes[self.rank]]

    def start(self) -> None:
        """Launch the collective(s), asynchronously."""
        self.own()
        if self.world == 1:
            if self.gathered:
                self._buffer.copy_(self._send)
            return
        if self.gathered:
            if self.largest:
                self._handles = [_all_gather(self._buffer, self._send, self.group, async_op=True)]
            return
        for r, size in enumerate(self.sizes):
            if size:
                src = r if self.group is None else dist.get_global_rank(self.group, r)
                piece = self._buffer[self.offsets[r]:self.offsets[r] + size]
                self._handles.append(dist.broadcast(piece, src=src, group=self.group, async_op=True))

    def wait(self) -> list[torch.Tensor]:
        """Every rank's slot, in rank order (views of one buffer); the buffer is released with them."""
        for handle in self._handles:
            handle.wait()
        self._handles = []
        buffer, self._buffer, self._send = self._buffer, None, None
        if self.gathered:
            return [buffer[r * self.largest:r * self.largest + size] for r, size in enumerate(self.sizes)]
        return [buffer[offset:offset + size] for offset, size in zip(self.offsets, self.sizes, strict=True)]
