"""When and where bases are refreshed: staggered over the ``T`` steps, optionally on side CUDA streams.

A *unit* is one mode ``k`` of one parameter. With ``stagger``, each unit gets an offset ``o ∈ [0, T)`` and is
refreshed at the steps with ``(t + o) mod T = 0``; offsets are chosen greedily, largest ``d_k³`` first, so every
step carries about ``1/T`` of the refresh work and no step spikes. Offsets depend only on the parameters' order
and shapes, so a resumed run keeps its schedule. Without ``stagger`` every offset is 0 (all bases at ``t mod T = 0``).

With ``asynchronous`` a due refresh is launched on one of a few side streams, reading a snapshot of
``S_k`` taken right after the step's fold, and installed at the start of the *next* step (the main stream waits
for it there): the QR or Cholesky work overlaps the next forward and backward pass, and the basis the next
update uses is one step staler than in the synchronous schedule. Off CUDA the refresh is computed at once but
installed at the next step as well, so the semantics do not depend on the device.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import attrs
import torch

from precond.layout import Layout
from precond.preconditioner import Preconditioner
from precond.stats import FallbackCounter

def _gather(state: dict[str, Any], index: torch.Tensor, k: int) -> dict[str, Any]:
    """Copies of the batch entries ``index`` of what a refresh of mode ``k`` reads or writes: ``S_k``, ``λ_k``,
    ``Q_k`` and the estimator's per-entry extras (a dense ``V``); nothing of the other modes."""
    mode = str(k)
    estimator = state["estimator"]
    sub = {"estimator": {name: {mode: estimator[name][mode].index_select(0, index)}
                         for name in ("S", "lambda") if mode in estimator[name]},
           "basis": {"Q": {mode: state["basis"]["Q"][mode].index_select(0, index)}}}
    for name, value in estimator.items():
        if isinstance(value, torch.Tensor):
            sub["estimator"][name] = value.index_select(0, index)
    sub["estimator"].setdefault("S", {})
    sub["estimator"].setdefault("lambda", {})
    return sub


def _scatter(state: dict[str, Any], sub: dict[str, Any], index: torch.Tensor) -> None:
    def walk(target: dict[str, Any], source: dict[str, Any]) -> None:
        for key, value in source.items():
            if isinstance(value, torch.Tensor):
                target[key].index_copy_(0, index, value)
            else:
                walk(target[key], value)

    for part in sub:
        walk(state[part], sub[part])


@attrs.define(eq=False)
class _Pending:
    preconditioner: Preconditioner
    state: dict[str, Any]
    layout: Layout
    mode: int
    index: Optional[torch.Tensor]
    device: torch.device
    result: Any
    done: Any


class RefreshSchedule:
    """Decides which units refresh at a step, runs the refreshes, and installs them (see module docstring)."""

    def __init__(self, stagger: bool, asynchronous: bool, streams: int = 4) -> None:
        self.stagger = stagger
        self.asynchronous = asynchronous
        self.n_streams = streams
        self._offsets: dict[tuple[int, int], int] = {}
        self._streams: dict[torch.device, list] = {}
        self._next = 0
        self.pending: list[_Pending] = []

    # --- offsets --------------------------------------------------------------------------------
    def plan(self, groups: Iterable[dict[str, Any]]) -> None:
        """Assign each unit an offset, balancing ``Σ d_k³`` over the ``T`` slots (per refresh period)."""
        units = []
        for group in groups:
            preconditioner: Preconditioner = group["preconditioner"]
            for p in group["params"]:
                layout = preconditioner.plan(p.shape)
                for k in preconditioner.refreshable_modes(layout):
                    units.append((layout.view_shape[k] ** 3, preconditioner.basis.every, id(p), k))
        self._offsets = {}
        loads: dict[int, list[int]] = {}
        for cost, every, pid, k in sorted(units, key=lambda u: -u[0]):  # stable: ties keep parameter order
            slots = loads.setdefault(every, [0] * every)
            offset = min(range(every), key=lambda o: slots[o]) if self.stagger else 0
            slots[offset] += cost
            self._offsets[(pid, k)] = offset

    def offset(self, p: torch.Tensor, k: int) -> Optional[int]:
        return self._offsets.get((id(p), k))

    # --- running ----------------------------------------------------------------------------------
    def after_update(self, preconditioner: Preconditioner, params: list[torch.Tensor], state: dict[str, Any],
                     layout: Layout, step: int, counter: FallbackCounter, groups: Iterable[dict[str, Any]]) -> None:
        """Refresh the units of these stacked ``params`` that are due at ``step`` (their statistics already folded)."""
        every = preconditioner.basis.every
        for k in preconditioner.refreshable_modes(layout):
            if any(self.offset(p, k) is None for p in params):
                self.plan(groups)
            offsets = [self.offset(p, k) for p in params]
            due = [i for i, o in enumerate(offsets) if (step + o) % every == 0]
            if not due:
                continue
            refresh_index = (step + offsets[due[0]]) // every - 1
            device = state["basis"]["Q"][str(k)].device
            index = None if len(due) == len(params) else torch.tensor(due, device=device)
            sub = state if index is None else _gather(state, index, k)
            if self.asynchronous:
                self._launch(preconditioner, state, layout, k, index, sub, counter, refresh_index)
            else:
                result = preconditioner.compute_refresh(sub, layout, k, counter, refresh_index)
                self._install(preconditioner, state, layout, k, index, result, sub=None if index is None else sub)

    def _launch(self, preconditioner, state, layout, k, index, sub, counter, refresh_index) -> None:
        """Start the refresh now, install it at the next step: on a side stream on CUDA, at once elsewhere
        (same semantics on every device, so CPU runs are a reference for GPU ones)."""
        device = state["basis"]["Q"][str(k)].device
        snapshot = {"estimator": {"S": {str(k): sub["estimator"]["S"][str(k)].clone()}},
                    "basis": {"Q": {str(k): sub["basis"]["Q"][str(k)]}}}
        if device.type != "cuda":
            result = preconditioner.compute_refresh(snapshot, layout, k, counter, refresh_index)
            self.pending.append(_Pending(preconditioner, state, layout, k, index, device, result, None))
            return
        main = torch.cuda.current_stream(device)
        ready = torch.cuda.Event()
        ready.record(main)
        streams = self._streams.setdefault(device, [torch.cuda.Stream(device) for _ in range(self.n_streams)])
        stream = streams[self._next % len(streams)]
        self._next += 1
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            result = preconditioner.compute_refresh(snapshot, layout, k, counter, refresh_index)
        for tensor in (snapshot["estimator"]["S"][str(k)], snapshot["basis"]["Q"][str(k)]):
            tensor.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        self.pending.append(_Pending(preconditioner, state, layout, k, index, device, result, done))

    def flush(self) -> None:
        """Install every pending asynchronous refresh (the current stream waits for each)."""
        pending, self.pending = self.pending, []
        for item in pending:
            if item.done is not None:
                main = torch.cuda.current_stream(item.device)
                main.wait_event(item.done)
                for tensor in (item.result.basis, item.result.eigenvalues, item.result.permutation):
                    if tensor is not None:
                        tensor.record_stream(main)
            self._install(item.preconditioner, item.state, item.layout, item.mode, item.index, item.result)

    def discard(self) -> None:
        self.pending = []

    @staticmethod
    def _install(preconditioner, state, layout, k, index, result, sub=None) -> None:
        """Install ``result`` for the batch entries ``index`` (all when None). ``sub``: their current state, if the
        caller just gathered it; the asynchronous case gathers afresh (the statistics moved on since the launch)."""
        if index is None:
            preconditioner.apply_refresh(state, layout, k, result)
            return
        if sub is None:
            sub = _gather(state, index, k)
        preconditioner.apply_refresh(sub, layout, k, result)
        _scatter(state, sub, index)
