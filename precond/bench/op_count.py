"""``python -m precond.bench.op_count``: how many top-level aten operations one ``step()`` issues (``--flops``: how
many floating-point operations its matrix products do).

Each operation an eager ``step()`` issues costs one dispatch on the host and, on a GPU, one kernel launch, so the number
of operations it issues is a deterministic measure of that host overhead that needs no GPU. (The overhead bounded the
uncaptured fast step in the first GPU profile; since the op cuts and with ``capture=True`` the measured step is bound
by its GPU work, not by launches: ``docs/benchmarks.md``.) An operation is *top-level* when
no other ``aten::`` operation encloses it (what the optimizer's Python code called; ``aten::einsum`` counts once, its
``bmm`` and views inside it do not). Views count too (they launch no kernel but cost dispatch time).

The gradients are drawn before profiling, so only ``step()`` is counted. Operations issued by a basis refresh (the
engine's ``bucket_step.refresh``, and the installation of pending asynchronous refreshes at the start of a step) are
counted apart: with ``stagger`` some refresh is due at most steps, and ``steady`` (the rest) is what a step without any
refresh due issues.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import Callable, Iterator, Sequence

import attrs
import torch

from precond.bench.timing import step_with

REFRESH = "precond::refresh"


@attrs.frozen
class OpCount:
    """Top-level aten operations per step, averaged over the counted steps: ``total`` and its ``refresh`` part."""

    total: float
    refresh: float

    @property
    def steady(self) -> float:
        """The operations of a step without a refresh: ``total − refresh``."""
        return self.total - self.refresh


def top_level(event) -> bool:
    """A profiler event of an ``aten::`` operation that no other ``aten::`` operation encloses."""
    return event.name.startswith("aten::") and (event.cpu_parent is None
                                                or not event.cpu_parent.name.startswith("aten::"))


def in_refresh(event) -> bool:
    """A profiler event inside a :func:`tagged_refreshes` range."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == REFRESH:
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def tagged_refreshes(optimizer: torch.optim.Optimizer,
                     around: Callable[[], contextlib.AbstractContextManager] = lambda: torch.profiler.record_function(
                         REFRESH)) -> Iterator[None]:
    """Wrap a ``precond.Optimizer``'s refresh entry points (its engine's ``bucket_step.refresh`` and
    ``schedule.flush``) in ``around()``, by default a profiler range named :data:`REFRESH` (instance attributes,
    removed again on exit; nothing else of the optimizer changes). Another optimizer is left alone."""
    engine = getattr(optimizer, "engine", None)
    targets = [(engine.bucket_step, "refresh"), (engine.schedule, "flush")] if engine is not None else []

    def tagged(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(*args, **kwargs):
            with around():
                return method(*args, **kwargs)
        return run

    for owner, name in targets:
        setattr(owner, name, tagged(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name in targets:
            delattr(owner, name)


def count_step_ops(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                   grads: Sequence[Sequence[torch.Tensor]]) -> OpCount:
    """Profile one ``optimizer.step()`` per entry of ``grads`` (the gradients of ``params`` for that step, made by the
    caller) and count the top-level aten operations of the steps (a ``precond.Optimizer``)."""
    with tagged_refreshes(optimizer), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_with(optimizer, params, grads)
    return counted(prof, len(grads))


def counted(prof: torch.profiler.profile, steps: int) -> OpCount:
    """The top-level aten operations per step of a profile of ``steps`` steps made under :func:`tagged_refreshes`."""
    top = [e for e in prof.events() if top_level(e)]
    refresh = sum(1 for e in top if in_refresh(e))
    return OpCount(total=len(top) / steps, refresh=refresh / steps)


def count_step_flops(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                     grads: Sequence[Sequence[torch.Tensor]]) -> OpCount:
    """As :func:`count_step_ops`, counting instead the floating-point operations of the matrix products
    (``torch.utils.flop_counter``: ``mm``, ``bmm``, ``addmm``, …, and so every ``einsum`` contraction; a
    multiply-add is 2) per step, with the refreshes' part apart. The factorisations (QR, ``eigh``, Cholesky) have
    no formula there and are not counted: the refresh part is its products only."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    depth, refresh = [0], [0]

    @contextlib.contextmanager
    def attributed() -> Iterator[None]:
        before = counter.get_total_flops()
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                refresh[0] += counter.get_total_flops() - before

    with tagged_refreshes(optimizer, attributed), counter:
        step_with(optimizer, params, grads)
    return OpCount(total=counter.get_total_flops() / len(grads), refresh=refresh[0] / len(grads))


def measure(name: str, shapes: Sequence[tuple[int, ...]], every: int = 10, max_dim: int = 2048, steps: int = 5,
            warmup: int | None = None, seed: int = 0, flops: bool = False) -> OpCount:
    """:func:`count_step_ops` (or with ``flops`` :func:`count_step_flops`) for the contender ``name``
    (``precond.bench.contenders``) on the CPU after ``warmup`` steps (default ``2T + 2``)."""
    from precond.bench.contenders import factory

    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    optimizer = factory(name, every, max_dim)(params)

    def gradients() -> list[torch.Tensor]:
        return [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]

    for _ in range(2 * every + 2 if warmup is None else warmup):
        for p, g in zip(params, gradients(), strict=True):
            p.grad = g
        optimizer.step()
    return (count_step_flops if flops else count_step_ops)(optimizer, params, [gradients() for _ in range(steps)])


def main(argv: list[str] | None = None) -> None:
    from precond.bench.shapes import PRESETS

    parser = argparse.ArgumentParser(prog="python -m precond.bench.op_count", description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default="kl_shampoo_fast_sync,kl_shampoo_fast_captured,soap")
    parser.add_argument("--shapes", default="small", choices=sorted(PRESETS))
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-dim", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="counted steps (default 10 = T: every stagger phase)")
    parser.add_argument("--flops", action="store_true",
                        help="count the matrix products' GFLOP per step instead of the operations")
    args = parser.parse_args(argv)
    what, scale = ("matrix-product GFLOP", 1e9) if args.flops else ("top-level aten ops", 1.0)
    print(f"| optimizer | {what} per step | of which refresh | steady (no refresh) |")
    print("| --- | --- | --- | --- |")
    digits = 3 if args.flops else 1
    for name in args.optimizers.split(","):
        count = measure(name, PRESETS[args.shapes], args.every, args.max_dim, args.steps, flops=args.flops)
        cells = [f"{value / scale:.{digits}f}" for value in (count.total, count.refresh, count.steady)]
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
