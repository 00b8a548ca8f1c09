"""Float64 parameter trajectories of every preset, recorded to prove that a refactor changes no number.

``python -m tests.trajectory_cases tests/data/trajectories_v2.pt`` records them (with the code of the tree it runs
in); ``tests/test_trajectories.py`` replays every case with the current code and demands bit-identical parameters.
The cases cover orders 1–4, two parameters of one shape (a stacked bucket), partial gradients (some parameters
without a gradient at some steps), two param groups, stagger on and off, asynchronous refresh, and refresh periods
1, 2 and 5. A checkpoint taken half-way (the current ``state_dict`` format) is stored as well, so a later format
can be shown to still load today's checkpoints.
"""

from __future__ import annotations

import copy
import itertools
import sys
from typing import Any

import torch

import precond

SHAPES = [(5,), (4, 6), (4, 6), (3, 4, 5), (2, 3, 2, 4)]
STEPS = 12
CHECKPOINT_AT = 6
MISSING = {4: (1, 3), 9: (1, 3), 10: (0,)}  # step → indices of parameters without a gradient
PERIODS = (1, 2, 5)
PRESETS = ("eshampoo", "idealized_kl_shampoo", "kl_shampoo", "kl_soap", "one_sided_shampoo", "shampoo", "soap")


def cases() -> list[dict[str, Any]]:
    out = []
    for preset, every, stagger in itertools.product(PRESETS, PERIODS, (False, True)):
        out.append({"preset": preset, "every": every, "stagger": stagger, "async_refresh": False})
    for preset in PRESETS:
        out.append({"preset": preset, "every": 2, "stagger": True, "async_refresh": True})
    return out


def case_name(case: dict[str, Any]) -> str:
    return f"{case['preset']}-T{case['every']}-{'stagger' if case['stagger'] else 'plain'}" + (
        "-async" if case["async_refresh"] else "")


def make_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64)) for shape in SHAPES]


def make_optimizer(case: dict[str, Any], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    factory = getattr(precond, case["preset"])
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 5e-4, "weight_decay": 0.01}]
    return factory(groups, lr=1e-3, every=case["every"], max_dim=5, stagger=case["stagger"],
                   async_refresh=case["async_refresh"], state_dtype=torch.float64)


def set_gradients(params: list[torch.nn.Parameter], step: int) -> None:
    missing = MISSING.get(step, ())
    for i, p in enumerate(params):
        if i in missing:
            p.grad = None
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) + 0.5 * p.detach() ** 3


def run(
    case: dict[str, Any], steps: range, params=None, optimizer=None, on_checkpoint=None
) -> list[list[torch.Tensor]]:
    """Parameters after each of ``steps`` (1-based step numbers)."""
    params = make_params() if params is None else params
    optimizer = make_optimizer(case, params) if optimizer is None else optimizer
    trajectory = []
    for step in steps:
        set_gradients(params, step)
        optimizer.step()
        trajectory.append([p.detach().clone() for p in params])
        if on_checkpoint is not None and step == CHECKPOINT_AT:
            on_checkpoint(params, optimizer)
    return trajectory


def record() -> dict[str, Any]:
    torch.set_num_threads(1)
    out = {}
    for case in cases():
        saved = {}

        def keep(params, optimizer):
            saved["params"] = [p.detach().clone() for p in params]
            saved["optimizer"] = copy.deepcopy(optimizer.state_dict())

        trajectory = run(case, range(1, STEPS + 1), on_checkpoint=keep)
        out[case_name(case)] = {"case": case, "trajectory": trajectory, "checkpoint": saved}
    return out


if __name__ == "__main__":
    torch.save(record(), sys.argv[1])
