"""A new runtime and a new executor are one module plus one line of the table (issue 22), shown by this test-only
module, the only file touched to add both:

- :class:`Loopback`, a throwaway *distributed mode* for one process: every update a bucket computes is staged (as
  owner mode stages it into its exchange) and the parameters move at the end of the step (:meth:`Runtime.finish`);
  chosen by ``distributed=LoopbackConfig()`` through its line of ``precond.compatibility.RUNTIMES``;
- :class:`Counting`, a throwaway *executor*: it takes every bucket and runs the one bucket step
  (``precond.executors.BucketStep``) eagerly, counting the buckets it ran; its line of
  ``precond.compatibility.EXECUTORS`` comes first, so it takes the buckets from the eager executor.

Neither changes the arithmetic, so the trajectories are bitwise those of the default runtime and executor. The
compatibility table refuses the new mode's combinations as any distributed mode's (its features include
``distributed``), with no rule added.
"""

from __future__ import annotations

import attrs
import pytest
import torch

import precond
from precond import compatibility, moves
from precond.executors import Executor
from precond.runtime import Runtime


@attrs.frozen
class LoopbackConfig:
    """The ``distributed=`` value that chooses :class:`Loopback` (its feature: ``mode='loopback'``)."""

    mode: str = "loopback"
    placement: str = "balanced"
    group: object = None


class Loopback(Runtime):
    """Stages every update and moves the parameters at the end of the step (module docstring)."""

    def __init__(self, config: LoopbackConfig, host) -> None:
        super().__init__(config, host)
        self.staged: list = []
        self.exchanged = 0

    def move(self, bucket, update: torch.Tensor) -> None:
        self.staged.append((bucket.group, bucket.params, update.clone(), bucket.layout))

    def finish(self) -> None:
        for group, params, update, layout in self.staged:
            moves.move(group, [(params, update, layout)])
        self.exchanged += len(self.staged)

    def end(self) -> None:
        self.staged = []


class Counting(Executor):
    """Every bucket, eagerly through the one bucket step, counted (module docstring)."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.ran = 0

    def takes(self, bucket) -> bool:
        return True

    def run(self, bucket, grads: list[torch.Tensor]) -> None:
        self.ran += 1
        self.bucket_step.run(bucket, grads)


RUNTIME_LINE = compatibility.Line("loopback", {"mode='loopback'"}, f"{__name__}:Loopback")
EXECUTOR_LINE = compatibility.Line("counting", (), f"{__name__}:Counting")


def _trajectory(steps: int = 7, **options) -> tuple[precond.Optimizer, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64))
              for shape in ((6, 4), (6, 4), (5,), (3, 2, 2))]
    optimizer = precond.soap(params, lr=0.05, every=2, state_dtype=torch.float64, weight_decay=0.01, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        optimizer.step()
    return optimizer, [p.detach().clone() for p in params]


@pytest.fixture
def table(monkeypatch):
    """The table with the two new lines (what a library module adding them would write into it)."""
    monkeypatch.setattr(compatibility, "RUNTIMES", (RUNTIME_LINE, *compatibility.RUNTIMES))
    monkeypatch.setattr(compatibility, "EXECUTORS", (EXECUTOR_LINE, *compatibility.EXECUTORS))


def test_a_new_runtime_and_executor_step_bit_for_bit_like_the_defaults(table):
    _, expected = _trajectory()  # the default runtime stays the one of a configuration without the new feature
    optimizer, actual = _trajectory(distributed=LoopbackConfig())
    runtime, executors = optimizer.engine.runtime, optimizer.engine.executors
    assert isinstance(runtime, Loopback) and isinstance(executors[0], Counting)
    assert runtime.exchanged > 0 and executors[0].ran > 0
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)


def test_the_table_refuses_the_new_mode_as_any_distributed_mode(table):
    with pytest.raises(compatibility.Incompatible) as refused:
        _trajectory(steps=0, distributed=LoopbackConfig(), capture="emulate")
    assert refused.value.rule.name == "capture_distributed"


def test_without_the_lines_the_defaults_run():
    optimizer, _ = _trajectory(steps=1)
    assert type(optimizer.engine.runtime).__name__ == "SingleProcess"
    assert [type(e).__name__ for e in optimizer.engine.executors] == ["Eager"]
