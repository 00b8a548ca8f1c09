"""Float64 parameter trajectories of every preset, recorded to prove that a refactor changes no number.

``python -m tests.trajectory_cases tests/data/trajectories_v3.pt`` records them (with the code of the tree it runs
in, one thread) together with the recording machine's fingerprint (``tests/fingerprint.py``);
``tests/test_trajectories.py`` replays every case with the current code: bit for bit on the recording machine, to
a derived round-off tolerance on any other.

The Kronecker-family presets (:data:`PRESETS`) run on five parameters of orders 1–4 (two of one shape: a stacked
bucket), with partial gradients (some parameters without a gradient at some steps), two param groups, stagger on
and off, asynchronous refresh, and refresh periods 1, 2 and 5. ``muon`` runs on the same parameters (its
Newton–Schulz iteration in float64: in its default bfloat16 a round-off difference of the input can flip a
rounding of the iteration, a change of 2⁻⁸ that no cross-machine tolerance could tell from a real one). ``kfac`` and
``ekfac`` train a small float64 MLP with a LayerNorm (whose parameters go to their Adam part) on fixed batches,
eigendecompositions every 1 and 2 steps. A checkpoint taken half-way (the current ``state_dict`` format) is stored
as well, so a later format can be shown to still load today's checkpoints.
"""

from __future__ import annotations

import copy
import itertools
import sys
from typing import Any, Callable, Optional

import torch

import precond

SHAPES = [(5,), (4, 6), (4, 6), (3, 4, 5), (2, 3, 2, 4)]
STEPS = 12
CHECKPOINT_AT = 6
MISSING = {4: (1, 3), 9: (1, 3), 10: (0,)}  # step → indices of parameters without a gradient
PERIODS = (1, 2, 5)
PRESETS = ("eshampoo", "idealized_kl_shampoo", "kl_shampoo", "kl_soap", "one_sided_shampoo", "shampoo", "soap")
"""The Kronecker-family presets (taking ``every``, ``max_dim``, ``stagger`` and ``async_refresh``)."""
MODEL_PRESETS = ("ekfac", "kfac")
LR = 1e-3
"""The largest learning rate of any case (the second param group's is 5e-4): the tolerance's scale of an update."""


def cases() -> list[dict[str, Any]]:
    out = []
    for preset, every, stagger in itertools.product(PRESETS, PERIODS, (False, True)):
        out.append({"preset": preset, "every": every, "stagger": stagger, "async_refresh": False})
    for preset in PRESETS:
        out.append({"preset": preset, "every": 2, "stagger": True, "async_refresh": True})
    out.append({"preset": "muon", "every": None, "stagger": False, "async_refresh": False})
    for preset, every in itertools.product(MODEL_PRESETS, (1, 2)):
        out.append({"preset": preset, "every": every, "stagger": False, "async_refresh": False})
    return out


FLOORED = ("eshampoo", "shampoo")
"""Presets whose default ``Power`` has the round-off floor (``floor="roundoff"``), added after v2 was recorded."""


def before_the_floor(case: dict[str, Any]) -> dict[str, Any]:
    """``case`` as the code before the round-off floor ran it (``floor=0``: Meta's exact ``Power``)."""
    return {**case, "options": {"floor": 0}} if case["preset"] in FLOORED else case


def case_name(case: dict[str, Any]) -> str:
    every = "" if case["every"] is None else f"-T{case['every']}"
    return f"{case['preset']}{every}-{'stagger' if case['stagger'] else 'plain'}" + (
        "-async" if case["async_refresh"] else "")


class Problem:
    """The parameters of a case and how each step's gradients are made: fixed random gradients plus a cubic pull
    towards zero for the parameter presets, the backward pass of a small MLP for the model presets."""

    def __init__(self, case: dict[str, Any]) -> None:
        self.case = case
        self.model: Optional[torch.nn.Module] = None
        if case["preset"] in MODEL_PRESETS:
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.LayerNorm(6),
                                              torch.nn.Linear(6, 3)).double()
            self.params = list(self.model.parameters())
        else:
            gen = torch.Generator().manual_seed(0)
            self.params = [torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64))
                           for shape in SHAPES]

    def optimizer(self) -> torch.optim.Optimizer:
        case, common = self.case, dict(state_dtype=torch.float64, stagger=self.case["stagger"],
                                       async_refresh=self.case["async_refresh"], **self.case.get("options", {}))
        if self.model is not None:
            return getattr(precond, case["preset"])(self.model, lr=LR, every=case["every"], factor_every=1,
                                                    weight_decay=0.01, **common)
        groups = [{"params": self.params[:3]}, {"params": self.params[3:], "lr": 5e-4, "weight_decay": 0.01}]
        if case["preset"] == "muon":
            return precond.muon(groups, lr=LR, adam_lr=LR, ns_dtype=torch.float64, **common)
        return getattr(precond, case["preset"])(groups, lr=LR, every=case["every"], max_dim=5, **common)

    def set_gradients(self, step: int) -> None:
        if self.model is not None:
            gen = torch.Generator().manual_seed(1000 * step)
            inputs = torch.randn(8, 4, generator=gen, dtype=torch.float64)
            targets = torch.randn(8, 3, generator=gen, dtype=torch.float64)
            for p in self.params:
                p.grad = None
            torch.nn.functional.mse_loss(self.model(inputs), targets).backward()
            return
        missing = MISSING.get(step, ())
        for i, p in enumerate(self.params):
            if i in missing:
                p.grad = None
                continue
            gen = torch.Generator().manual_seed(1000 * step + i)
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) + 0.5 * p.detach() ** 3


def run(case: dict[str, Any], steps: range, problem: Optional[Problem] = None,
        optimizer: Optional[torch.optim.Optimizer] = None, on_checkpoint: Optional[Callable] = None,
        after_gradients: Optional[Callable[[Problem, int], None]] = None,
        after_step: Optional[Callable[[Problem, int], None]] = None) -> list[list[torch.Tensor]]:
    """Parameters after each of ``steps`` (1-based step numbers). ``after_gradients(problem, step)`` may alter the
    gradients before the step (the conditioning test perturbs them), ``after_step(problem, step)`` the parameters
    after it (the tolerance test changes one update)."""
    problem = Problem(case) if problem is None else problem
    optimizer = problem.optimizer() if optimizer is None else optimizer
    trajectory = []
    for step in steps:
        problem.set_gradients(step)
        if after_gradients is not None:
            after_gradients(problem, step)
        optimizer.step()
        if after_step is not None:
            after_step(problem, step)
        trajectory.append([p.detach().clone() for p in problem.params])
        if on_checkpoint is not None and step == CHECKPOINT_AT:
            on_checkpoint(problem.params, optimizer)
    return trajectory


def resumed(case: dict[str, Any], checkpoint: dict[str, Any]) -> list[list[torch.Tensor]]:
    """The trajectory after :data:`CHECKPOINT_AT` of a fresh problem and optimizer loaded from ``checkpoint``."""
    problem = Problem(case)
    with torch.no_grad():
        for p, saved in zip(problem.params, checkpoint["params"], strict=True):
            p.copy_(saved)
    optimizer = problem.optimizer()
    optimizer.load_state_dict(checkpoint["optimizer"])
    return run(case, range(CHECKPOINT_AT + 1, STEPS + 1), problem, optimizer)


def record() -> dict[str, Any]:
    from tests.fingerprint import fingerprint

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for case in cases():
        saved = {}

        def keep(params, optimizer, saved=saved):
            saved["params"] = [p.detach().clone() for p in params]
            saved["optimizer"] = copy.deepcopy(optimizer.state_dict())

        trajectory = run(case, range(1, STEPS + 1), on_checkpoint=keep)
        out[case_name(case)] = {"case": case, "trajectory": trajectory, "checkpoint": saved}
    return {"fingerprint": fingerprint(), "steps": STEPS, "cases": out}


if __name__ == "__main__":
    torch.save(record(), sys.argv[1])
