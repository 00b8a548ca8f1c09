"""When and where bases are refreshed: staggered over the ``T`` steps, optionally on side CUDA streams.

A *unit* is one mode ``k`` of one parameter. With ``stagger``, each unit gets an offset ``o ∈ [0, T)`` and is
refreshed after the update of the steps with ``(t + o) mod T = 0`` (:func:`precond.refresh.is_due`, the one due
rule); offsets are chosen greedily, largest ``d_k³`` first, so every step carries about ``1/T`` of the refresh work
and no step spikes. Offsets depend only on the parameters' order and shapes, so a resumed run keeps its schedule.
Without ``stagger`` every offset is 0 (all bases at ``t mod T = 0``).

With ``asynchronous`` a due refresh is launched on one of a few side streams, reading a snapshot of ``S_k`` taken
right after the step's fold, and installed at the start of the *next* step (the main stream waits for it there):
the QR or Cholesky work overlaps the next forward and backward pass. Nothing reads ``Q_k`` or ``λ_k`` between the
launch and the install, so the updates are exactly those of the synchronous schedule (tested). Off CUDA the refresh
is computed at once but installed at the next step as well, so the code path does not depend on the device.

The schedule knows nothing of the state: it is handed a computation and an installation for each due refresh.
"""

from __future__ import annotations

from typing import Callable, Hashable, Optional, Sequence

import attrs
import torch

from precond.refresh import Refresh, is_due, refresh_index

Unit = tuple[Hashable, int, int]
"""``(key, d_k, T)``: a unit's identity, its dimension and its refresh period."""


@attrs.define(eq=False)
class _Pending:
    install: Callable[[Refresh], None]
    device: torch.device
    result: Refresh
    done: Optional[torch.cuda.Event]


class RefreshSchedule:
    """Offsets of the units, the due test, the side streams and the pending results (see module docstring)."""

    def __init__(self, stagger: bool, asynchronous: bool, streams: int = 4) -> None:
        self.stagger = stagger
        self.asynchronous = asynchronous
        self.n_streams = streams
        self._offsets: dict[Hashable, int] = {}
        self._streams: dict[torch.device, list[torch.cuda.Stream]] = {}
        self._next = 0
        self.pending: list[_Pending] = []

    # --- when ---------------------------------------------------------------------------------------
    def plan(self, units: Sequence[Unit]) -> None:
        """Assign each unit an offset, balancing ``Σ d_k³`` over the ``T`` slots (per refresh period); ``units`` in
        parameter order (ties keep it)."""
        self._offsets = {}
        loads: dict[int, list[int]] = {}
        for key, d, every in sorted(units, key=lambda u: -u[1] ** 3):
            slots = loads.setdefault(every, [0] * every)
            offset = min(range(every), key=lambda o: slots[o]) if self.stagger else 0
            slots[offset] += d**3
            self._offsets[key] = offset

    def offset(self, key: Hashable) -> Optional[int]:
        """The unit's offset (None if it was not planned)."""
        return self._offsets.get(key)

    def knows(self, keys: Sequence[Hashable]) -> bool:
        return all(key in self._offsets for key in keys)

    def due(self, keys: Sequence[Hashable], every: int, step: int) -> tuple[list[int], int]:
        """Positions (in ``keys``) of the units due after the update of ``step``, and the 0-based index of that
        refresh (units due together share it)."""
        offsets = [self._offsets[key] for key in keys]
        positions = [i for i, o in enumerate(offsets) if is_due(step, o, every)]
        return positions, (refresh_index(step, offsets[positions[0]], every) if positions else 0)

    # --- where ---------------------------------------------------------------------------------------
    def run(self, device: torch.device, compute: Callable[[], Refresh], install: Callable[[Refresh], None],
            reads: Sequence[torch.Tensor]) -> None:
        """Compute a refresh and install it: at once, or (``asynchronous``) on a side stream and at the next step.
        ``reads``: the tensors ``compute`` reads, which must stay alive until the side stream is done with them."""
        if not self.asynchronous:
            install(compute())
            return
        if device.type != "cuda":
            self.pending.append(_Pending(install, device, compute(), None))
            return
        main = torch.cuda.current_stream(device)
        ready = torch.cuda.Event()
        ready.record(main)
        streams = self._streams.setdefault(device, [torch.cuda.Stream(device) for _ in range(self.n_streams)])
        stream = streams[self._next % len(streams)]
        self._next += 1
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            result = compute()
        for tensor in reads:
            tensor.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        self.pending.append(_Pending(install, device, result, done))

    def flush(self) -> None:
        """Install every pending asynchronous refresh (the current stream waits for each)."""
        pending, self.pending = self.pending, []
        for item in pending:
            if item.done is not None:
                main = torch.cuda.current_stream(item.device)
                main.wait_event(item.done)
                for tensor in item.result.tensors():
                    tensor.record_stream(main)
            item.install(item.result)

    def discard(self) -> None:
        self.pending = []
