"""Where a step's time goes on the device: kernel time against wall time, per ``optimizer.step()``.

:func:`profile_steps` runs one ``step()`` per entry of ``grads`` under the torch profiler and splits each step's wall
time ``t_wall`` into the time the device spent in kernels ``t_kernel`` (summed self device time of every kernel,
memory copies and sets included) and the rest. Collective kernels (NCCL's names start with ``nccl``) are counted
apart, ``t_comm``, since a rank waiting for a peer inside a collective shows up there. Then

    busy = t_kernel / t_wall                                                                               (1)

is the fraction of the step the device worked: close to 1 the step is bound by the device's arithmetic and memory
traffic; well below 1 by the host (launches, Python, synchronisation). Kernels on several streams (``async_refresh``)
may overlap, so ``busy`` can then exceed 1. The largest kernels are returned by name. On a CPU-only run there are no
device kernels and only the wall time is meaningful.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from precond.bench.timing import profiler_activities, step_with, sync


def _kernels(prof: torch.profiler.profile) -> list[tuple[str, float]]:
    """(name, microseconds) of every device activity the profiler saw: kernels, copies and sets; the device-side
    ranges of user annotations (``Optimizer.step#…``, ``record_param_comms``) span kernels and are left out."""
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def profile_steps(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                  grads: Sequence[Sequence[torch.Tensor]], device: torch.device, top: int = 8) -> dict[str, Any]:
    """Eq. (1) for ``len(grads)`` steps of ``optimizer`` on ``params`` (``grads``: each step's gradients, made by
    the caller): milliseconds per step of wall time, kernel time and collective-kernel time, the busy fraction and
    the ``top`` kernels by device time (name, ms per step)."""
    sync(device)
    with torch.profiler.profile(activities=profiler_activities(device)) as prof:
        start = time.perf_counter()
        step_with(optimizer, params, grads)
        sync(device)
        wall = (time.perf_counter() - start) * 1e3 / len(grads)
    totals: dict[str, float] = {}
    for name, us in _kernels(prof):
        totals[name] = totals.get(name, 0.0) + us / 1e3 / len(grads)
    kernels = sorted(totals.items(), key=lambda item: -item[1])
    kernel = sum(ms for _, ms in kernels)
    comm = sum(ms for name, ms in kernels if name.lower().startswith("nccl"))
    return {"wall_ms_per_step": wall, "kernel_ms_per_step": kernel, "comm_kernel_ms_per_step": comm,
            "busy": kernel / wall if wall > 0 else 0.0,
            "top_kernels": [[name[:80], round(ms, 4)] for name, ms in kernels[:top]]}
