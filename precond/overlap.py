"""Preconditioning inside the backward pass (``precond.Optimizer(overlap_backward=True)``).

A post-accumulate-grad hook on every parameter marks its gradient final. When every member of a bucket has its
gradient, the bucket's whole state step — momentum, the estimator's ``prepare``, the applier, the fold and the due
refreshes — starts at once, on a side CUDA stream, while autograd goes on computing the gradients of earlier layers.
``step()`` then waits for those streams and only moves the parameters (decay and ``W ← W − η U``, with the ``lr``
of that moment); buckets that did not start (the first step, a bucket missing a gradient) take the ordinary path.
The arithmetic is the ordinary step's (``precond.executors.BucketStep``, run by the executor :class:`InBackward`), so
the updates are identical (tested on CPU, where the hook runs inline).

What it requires, because the work starts before ``step()`` is called:

- the gradient a hook sees must be the final one: no clipping by a global norm, no ``GradScaler`` unscaling and no
  other change of ``.grad`` between ``backward()`` and ``step()`` (use the ordinary path for those);
- with gradient accumulation, run every backward but the last inside ``with optimizer.accumulating():``;
- ``on_nonfinite="ignore"``: a step whose state already moved during the backward cannot be refused afterwards.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch

from precond.buckets import Bucket
from precond.executors import Executor
from precond.param_groups import check_hyperparameters, plain_hyperparameters
from precond.precision import tf32_matmuls


class InBackward(Executor):
    """The hooks, the side streams and the updates computed during the backward pass (module docstring)."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self._handles: list = []
        self._bucket_of: dict[int, Bucket] = {}
        self._ready: set[int] = set()
        self._started: dict[int, tuple[Bucket, torch.Tensor, Optional[torch.cuda.Event]]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._paused = False
        self._flushed = False

    def add_params(self, params: list[torch.Tensor]) -> None:
        ref = weakref.ref(self)  # the hooks live as long as the parameters; this executor as long as its optimizer

        def hook(p: torch.Tensor) -> None:
            executor = ref()
            if executor is not None and executor.engine.alive:
                executor.gradient_ready(p)

        self._handles += [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside this block accumulate gradients without starting any preconditioning."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def settle(self, buckets: list[Bucket]) -> None:
        """Which bucket each parameter is in now (after ``step()`` may have split or merged buckets)."""
        self._bucket_of = {id(p): b for b in buckets for p in b.params if b.step >= 1}
        self._ready.clear()
        self._flushed = False

    @torch.no_grad()
    def gradient_ready(self, p: torch.Tensor) -> None:
        """The post-accumulate-grad hook of ``p``: start its bucket once every member has its gradient."""
        bucket = self._bucket_of.get(id(p))
        if self._paused or bucket is None or id(bucket) in self._started:
            return
        self._ready.add(id(p))
        if not all(id(q) in self._ready for q in bucket.params):
            return
        engine = self.engine
        if not self._flushed:  # refreshes launched at the last step are installed before this step uses the bases
            engine.schedule.flush()
            self._flushed = True
        grads = [q.grad for q in bucket.params]
        device = bucket.params[0].device
        with contextlib.ExitStack() as scope:
            if engine.tf32 is not None:  # the hook runs outside step(): the same matmul precision as inside it
                scope.enter_context(tf32_matmuls(engine.tf32))
            if device.type != "cuda":
                self._started[id(bucket)] = (bucket, self._advance(bucket, grads), None)
                return
            main = torch.cuda.current_stream(device)
            stream = self._streams.setdefault(device, torch.cuda.Stream(device))
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                update = self._advance(bucket, grads)
        for grad in grads:
            grad.record_stream(stream)
        done = torch.cuda.Event()
        done.record(stream)
        self._started[id(bucket)] = (bucket, update, done)

    def _advance(self, bucket: Bucket, grads: list[torch.Tensor]) -> torch.Tensor:
        """The bucket step's direction and finish, started from a gradient hook: the group is checked first."""
        check_hyperparameters(plain_hyperparameters(bucket.group), read_tensor=False)
        return self.bucket_step.advance(bucket, grads)

    def take(self) -> list[tuple[Bucket, torch.Tensor]]:
        """The buckets started during the backward and their updates (the current stream waits for each)."""
        started, self._started = list(self._started.values()), {}
        out = []
        for bucket, update, done in started:
            if done is not None:
                main = torch.cuda.current_stream(update.device)
                main.wait_event(done)
                update.record_stream(main)
            out.append((bucket, update))
        return out
