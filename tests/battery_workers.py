"""What the 2 gloo ranks of the battery run (``tests/distributed_harness.spawn``): every distributed (entry, mode)
pair the compatibility table allows, in one process group, each rank stepping the same gradients."""

from __future__ import annotations

import traceback
from typing import Any

from tests import registry
from tests.battery_modes import BY_NAME
from tests.battery_problem import parameters
from tests.battery_runs import release, trained


def key(entry_name: str, mode_name: str) -> str:
    return f"{entry_name}|{mode_name}"


def battery(rank: int, world: int, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``{entry|mode: parameters after the run}``, or ``{"error": traceback}`` for a pair that raised (the pairs are
    run alike on every rank, so a pair that raises does so on every rank, and the next pair starts together)."""
    out: dict[str, Any] = {}
    for entry_name, mode_name in pairs:
        try:
            model, optimizer = trained(registry.entry(entry_name), BY_NAME[mode_name])
            release(optimizer)
            out[key(entry_name, mode_name)] = parameters(model)
        except Exception:
            out[key(entry_name, mode_name)] = {"error": traceback.format_exc()}
    return out
