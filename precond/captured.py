"""The captured step: a bucket's steady-state update replayed as one CUDA graph instead of ~100 kernel launches.

After its first update a bucket's shapes, tensors and control flow do not change, so its per-step work — momentum,
the estimator's ``prepare``, the applier, the fold, weight decay and ``W ← W − η U`` — is recorded once into a CUDA
graph and replayed every step. What changes between steps enters through static device buffers filled before each
replay: the gradients (one ``_foreach_copy_``), the step count ``t`` (a float64 tensor: bias corrections are
computed on the device, to float64 round-off of the host's) and the learning rate (float64, so ``η U`` is the same
float32 product as with a Python float). Host-side decisions (``folds_at``, which refreshes are due) are made on the
host as before; basis refreshes run after the replay, eagerly (they are due only every ``T`` steps per mode and use
LAPACK calls that cannot be captured) or, for a basis of products alone (``bases.Refine``), from graphs of their
own (``precond.captured_refresh``). A graph is recaptured when its bucket changes (split, merge, reload) or when a
group's hyperparameters other than ``lr`` change. All graphs share one memory pool (they run one after another).

``capture="emulate"`` runs the same body eagerly with the same static buffers: the CPU reference of the captured
path. :class:`Captured` is an executor (``precond.executors``) of the step of ``precond.executors.BucketStep``.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from precond.buckets import Bucket
from precond.executors import Executor
from precond.moves import move

_IGNORED_IN_SIGNATURE = ("params", "lr", "preconditioner")


@attrs.define(eq=False)
class _Captured:
    grads: list[torch.Tensor]
    step: torch.Tensor
    lr: torch.Tensor
    signature: tuple
    graphs: dict[bool, torch.cuda.CUDAGraph] = attrs.field(factory=dict)
    """One graph per fold decision: a step that folds, and (``fold_every > 1``) one that does not."""


def _signature(group: dict[str, Any]) -> tuple:
    """What a graph bakes in besides its buffers: every hyperparameter of the group except ``lr``."""
    return tuple(sorted((k, repr(v)) for k, v in group.items() if k not in _IGNORED_IN_SIGNATURE)) + (
        id(group["preconditioner"]),)


class Captured(Executor):
    """Per-bucket CUDA graphs of the steady-state step (``precond.Optimizer(capture=True)``; ``"emulate"``: the same
    body without graphs)."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.use_graphs = engine.options["capture"] is True
        self._captured: dict[int, tuple[Bucket, _Captured]] = {}
        self._pool = None

    def takes(self, bucket: Bucket) -> bool:
        """A bucket is replayed from its second update on, on CUDA (anywhere without graphs); not with Meta's
        ``order="fold_then_apply"``, whose refreshes sit between the fold and the apply."""
        preconditioner = bucket.preconditioner
        return (
            bucket.step >= 1
            and preconditioner.refreshes_at(bucket.step + 1)
            and not preconditioner.folds_before_apply
            and (not self.use_graphs or bucket.params[0].device.type == "cuda")
        )

    def prepare(self, buckets: list[Bucket]) -> None:
        """Drop the graphs of buckets that no longer exist (split, merged or rebuilt)."""
        alive = {id(b) for b in buckets}
        for key in [k for k in self._captured if k not in alive]:
            del self._captured[key]

    def run(self, bucket: Bucket, grads: list[torch.Tensor]) -> None:
        """Replay (capturing first if needed) the update of ``bucket`` for step ``bucket.step + 1``: direction, fold,
        decay and parameter update; then the due refreshes (eagerly) and the step count."""
        self.replay(bucket, grads)
        self.bucket_step.finish(bucket, bucket.step + 1)

    def replay(self, bucket: Bucket, grads: list[torch.Tensor]) -> None:
        entry = self._captured.get(id(bucket))
        captured = entry[1] if entry is not None and entry[0] is bucket else None
        if captured is None or captured.signature != _signature(bucket.group):
            captured = self._buffers(bucket, grads)
            self._captured[id(bucket)] = (bucket, captured)
        torch._foreach_copy_(captured.grads, grads)
        captured.step.fill_(bucket.step + 1)
        lr = bucket.group["lr"]
        if isinstance(lr, torch.Tensor):
            captured.lr.copy_(lr)
        else:
            captured.lr.fill_(lr)
        fold = bucket.preconditioner.folds_at(bucket.step + 1)
        if not self.use_graphs:
            self._body(bucket, captured, fold)
            return
        if fold not in captured.graphs:
            captured.graphs[fold] = self._capture(bucket, captured, fold)
        captured.graphs[fold].replay()

    @staticmethod
    def _buffers(bucket: Bucket, grads: list[torch.Tensor]) -> _Captured:
        device = bucket.params[0].device
        return _Captured(grads=[torch.empty_like(g) for g in grads],
                         step=torch.zeros((), dtype=torch.float64, device=device),
                         lr=torch.zeros((), dtype=torch.float64, device=device),
                         signature=_signature(bucket.group))

    def _body(self, bucket: Bucket, captured: _Captured, fold: bool) -> None:
        update = self.bucket_step.direction(bucket, captured.grads, captured.step, fold=fold)
        move(bucket.group, [(bucket.params, update, bucket.layout)], captured.lr)

    def _capture(self, bucket: Bucket, captured: _Captured, fold: bool) -> torch.cuda.CUDAGraph:
        """Record the body (capture runs no kernel); the caller's replay then performs this step's update."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.current_stream().synchronize()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="relaxed"):
            self._body(bucket, captured, fold)
        return graph
