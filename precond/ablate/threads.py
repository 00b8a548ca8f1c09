"""How many CPU threads a run of the workbench uses.

torch's default (one thread per core) makes a small run slow and erratic on a busy machine: on a 2-core CPU
shared with other work, a 256 × 256 ``eigh`` took 4.6 s with 2 threads against 5 ms with 1, and a run of the
demo was several times slower. The runs here are small (a tiny GPT, a few 64 × 64 factors), so one thread per
run is the workbench's CPU default; ``threads`` (``--threads``) overrides it. The count also changes a CPU run's
floating-point results (reductions are split per thread), so it is part of a CPU run's resume key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

CPU_DEFAULT = 1
"""Threads of a CPU run when the configuration does not say."""


def threads_for(requested: int | None, device: torch.device) -> int | None:
    """``requested`` if set; else :data:`CPU_DEFAULT` on the CPU and ``None`` (torch's own setting) on a GPU,
    where the CPU only launches kernels."""
    if requested is not None:
        return requested
    return CPU_DEFAULT if device.type == "cpu" else None


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, then the previous count again (``None``: unchanged)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
