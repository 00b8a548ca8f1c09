"""What the ranks of ``tests/test_rotation_precision.py``'s distributed test run (imported in spawned processes)."""

from __future__ import annotations

import torch

import precond
from tests import distributed_workers as w

PRESETS = ("kl_shampoo", "soap")
MODES = ("owner", "replicate")


def case_name(preset: str, mode: str) -> str:
    return f"{preset}-{mode}"


def parity(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    """Parameters after the distributed cases of ``tests/distributed_workers`` with bfloat16 rotations."""
    return {case_name(preset, mode): w.trajectory({"preset": preset, "mode": mode}, precond.DataParallel(mode=mode),
                                                  rotation_dtype=torch.bfloat16)[0]
            for preset in PRESETS for mode in MODES}
