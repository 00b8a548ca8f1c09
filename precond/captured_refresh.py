"""Captured basis refreshes: a refresh made of matrix products alone (``bases.Refine``) replayed as a CUDA graph.

An eager refresh of ``bases.Refine`` issues about 130 operations (two sweeps of nine products and their
elementwise work); at the sizes of a small model's factors the host's launches, not the device, set its time. With
``precond.Optimizer(capture=True)`` and a basis that declares ``capturable = True`` (its refresh has no LAPACK call,
no host synchronisation and no data-dependent shapes), the refreshes of each mode ``k`` of a bucket run entry by
entry, one factor at a time; the first eagerly (it creates what the refresh makes lazily, e.g. the fallback counters
and the probe of the bfloat16 product), the later ones through one CUDA graph of the refresh of a single factor,
recorded at the second:

    for each due entry i:   in ← (S_k[i], Q_k[i]);   replay;   out_i ← clone(result)
    result = stack(out_i)

One graph per (bucket, mode), not per number of due entries, bounds the memory the graphs hold to one factor's
intermediates each; replays of one graph run one after another on one stream, and each result is copied out before
the next, so the graph's buffers are never read and written at once (two buckets' refreshes on two side streams use
two graphs, each with a private memory pool). A replay runs the kernels of the eager refresh of one entry, so the
bases are those of ``capture="emulate"`` (the same per-entry path eagerly, on any device) to the bit; against the
batched refresh of ``capture=False`` they agree to float32 round-off (a product of a batch of one and a slice of a
batched product may round differently). ``tests/test_captured_refresh.py`` checks both, on CUDA with ``-m gpu``.
A resumed run takes the same per-entry path, so ``state_dict`` resume stays exact.

Where recording fails, a warning says so and that bucket mode's refreshes run the same per-entry path eagerly.
Each replay reads only its static inputs, so a graph outlives ``load_state_dict`` and the refresh schedule; graphs of
buckets that no longer exist are dropped (:meth:`RefreshGraphs.prepare`).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import attrs
import torch

from precond.refresh import Refresh

Compute = Callable[[torch.Tensor, torch.Tensor], Refresh]
"""``(S_k, Q_k) → Refresh`` of a batch of factors (no state is written)."""


@attrs.define(eq=False)
class _Graph:
    owner: Any  # the bucket, checked by identity (an id may be reused by a later bucket)
    factor: Optional[torch.Tensor] = None  # static inputs, (1, d, d)
    basis: Optional[torch.Tensor] = None
    output: Optional[Refresh] = None
    graph: Optional[torch.cuda.CUDAGraph] = None


def capturable(basis: Any) -> bool:
    """Whether ``basis``'s refresh may be recorded as a CUDA graph (its class says so: ``capturable = True``)."""
    return bool(getattr(basis, "capturable", False))


class RefreshGraphs:
    """The captured refreshes of an optimizer (module docstring). ``mode``: ``True`` (CUDA graphs on CUDA tensors)
    or ``"emulate"`` (the same per-entry path without graphs, on any device)."""

    def __init__(self, mode: Union[bool, str]) -> None:
        self.mode = mode
        self._graphs: dict[tuple[int, int], _Graph] = {}

    def takes(self, basis: Any, device: torch.device) -> bool:
        """Whether refreshes of ``basis`` on ``device`` go through :meth:`compute`."""
        if not capturable(basis):
            return False
        return self.mode == "emulate" or (self.mode is True and device.type == "cuda")

    def prepare(self, buckets: list[Any]) -> None:
        """Drop the graphs of buckets that no longer exist (split, merged or rebuilt)."""
        alive = {id(b) for b in buckets}
        for key in [key for key in self._graphs if key[0] not in alive]:
            del self._graphs[key]

    def compute(self, owner: Any, k: int, compute: Compute, factor: torch.Tensor, basis: torch.Tensor) -> Refresh:
        """The refresh of the ``B`` factors ``factor``/``basis`` of mode ``k`` of bucket ``owner``, entry by entry:
        at the (bucket, mode)'s first refresh eagerly, then through its graph (``"emulate"``: its static buffers)."""
        key = (id(owner), k)
        entry = self._graphs.get(key)
        if entry is None or entry.owner is not owner:
            self._graphs[key] = _Graph(owner)
            return _stack([compute(factor[i:i + 1], basis[i:i + 1]).tensors_with_gaps()
                           for i in range(factor.shape[0])])
        if entry.factor is None:
            entry.factor, entry.basis = factor[:1].clone(), basis[:1].clone()
            if self.mode is True:
                try:
                    entry.graph, entry.output = _record(compute, entry.factor, entry.basis)
                except RuntimeError as error:  # e.g. an operation CUDA cannot capture: the same refresh, uncaptured
                    warnings.warn(f"precond: a basis refresh could not be recorded as a CUDA graph ({error}); this "
                                  "bucket mode's refreshes run eagerly, one factor at a time (the same results)",
                                  RuntimeWarning, stacklevel=2)
        return _stack([self._one(entry, compute, factor[i:i + 1], basis[i:i + 1]) for i in range(factor.shape[0])])

    def _one(self, entry: _Graph, compute: Compute, factor: torch.Tensor,
             basis: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """One entry: copied into the static inputs, refreshed (replay, or the eager body), copied out."""
        assert entry.factor is not None and entry.basis is not None
        entry.factor.copy_(factor)
        entry.basis.copy_(basis)
        if entry.graph is not None:
            entry.graph.replay()
            output = entry.output
        else:
            output = compute(entry.factor, entry.basis)
        assert output is not None
        return tuple(None if t is None else t.clone() for t in output.tensors_with_gaps())


def _stack(outputs: list[tuple[Optional[torch.Tensor], ...]]) -> Refresh:
    """The refreshes of single entries as one batched ``Refresh``."""
    return Refresh(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs, strict=True)))


def _record(compute: Compute, factor: torch.Tensor, basis: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, Refresh]:
    """Record ``compute`` on the static inputs (capture runs no kernel: the first replay computes), in a private
    memory pool: a refresh may run on a side stream beside the captured step and other refreshes."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.current_stream().synchronize()
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        output = compute(factor, basis)
    return graph, output
