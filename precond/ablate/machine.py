"""What a run's times depend on besides the optimizer: the machine's load and its CPU and GPU models.

Every record states them (``load``, ``machine``), so a per-second number can be judged afterwards: a run timed
while other work kept the cores busy is slower than the optimizer is, and the summary flags a variant whose runs'
step times spread widely (:mod:`precond.ablate.timing`).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

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


def describe(device: torch.device) -> dict[str, Any]:
    """``{"cpu": model, "cores": count, "gpu": model or None}`` of the machine a run on ``device`` uses."""
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu}

