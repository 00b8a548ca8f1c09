"""What a run's times depend on besides the optimizer: the machine's load and its CPU and GPU models.

Every record states them (``load``, ``machine``), so a per-second number can be judged afterwards: a run timed
while other work kept the cores busy is slower than the optimizer is, and the summary flags a variant whose runs'
step times spread widely (:mod:`precond.ablate.timing`).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any, Iterable, Mapping

import torch


def load() -> list[float] | None:
    """The load averages over 1, 5 and 15 minutes (``os.getloadavg``), rounded; ``None`` where the system has
    none (Windows)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def boot_id() -> str | None:
    """The kernel's boot id (``/proc/sys/kernel/random/boot_id`` on Linux, its first 8 hex digits): two runs
    with different ids ran on different machines (or across a reboot), whose times two lent GPUs of the same
    model can differ by 10–15 % (``docs/benchmarks.md``); ``None`` where the system has none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip().replace("-", "")[:8] or None
    except OSError:
        return None


def describe(device: torch.device) -> dict[str, Any]:
    """``{"cpu": model, "cores": count, "gpu": model or None, "boot": boot id or None}`` of the machine a run on
    ``device`` uses."""
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "boot": boot_id()}


def instances(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The machine instances (boot ids, sorted) the records ran on; records made before ids were kept add none."""
    return sorted({boot for record in records if (boot := (record.get("machine") or {}).get("boot"))})

