"""``python -m precond.bench.refresh_drift``: how much drift a basis refresh removes, by mode size.

KL-Shampoo (``drift_tolerance=0.2``, staggered T = 10) trains a small byte-level GPT (``char_lm``) on the CPU; after
every step, for every mode of every matrix, the relative off-diagonal norm ``r`` of ``QᵀSQ`` (``precond.drift``) is
measured in float64. At each refresh it reports ``r`` just before (the previous step's) and just after it, and what
the same refresh would have left with ``p = 2`` (``bases.QRPowerStep(power=2)``: one QR of ``S² Q_old``), and,
over the second half of the run, the mean ``r`` and how often it is at least τ = 0.2 — how often a drift check
would refresh that mode. The numbers quoted in ``bases.QRPowerStep``'s docstring come from::

    OMP_NUM_THREADS=1 python -m precond.bench.refresh_drift --steps 300

``--rule budget`` trains the race's budgeted configuration instead (``docs/benchmarks.md``: the tracked drift check
at τ, ``refresh_budget=50``, ``fold_every=2`` with ``β₂ = 0.95²``), whose refreshes start from older bases (the budget
defers most due refreshes). ``--refine`` adds what ``bases.Refine`` (its defaults: two sweeps, TF32 products
emulated on the CPU) would have left from the same old basis and factor at each refresh, and how often it would
have kept the old basis (a sweep it rejects): the two refreshes compared on the same starts, along one trajectory
(the one the QR refreshes make). ``r`` weighs each direction by its eigenvalue, so it hardly sees the small ones,
which the preconditioner scales the most; ``--refine`` therefore also reports, for the QR refresh and for Refine,
the relative error of the inverse root each basis gives, ``‖Q D^{-1/2} Qᵀ − S^{-1/2}‖_F / ‖S^{-1/2}‖_F`` with
``D = diag(QᵀSQ)``, both spectra raised to KL's floor ``max(10, min(d, 4000))^{-2}``
(``precond.bench.refine_quality.root_error``).
"""

from __future__ import annotations

import argparse
import collections
from typing import Iterator, Sequence

import torch

import bases
import precond
from bases.qr_power_step import power_step
from precond.bench.refine_quality import root_error
from precond.drift import offdiagonal_ratio
from precond.tasks import make_task
from precond.tasks.base import stream

TASK = {"layers": 2, "width": 128, "heads": 4, "context": 64, "batch_size": 16}
"""The CPU task of the drift A/Bs in ``docs/benchmarks.md``."""


def _ratio(factor: torch.Tensor, basis: torch.Tensor) -> float:
    return offdiagonal_ratio(factor[None].double(), basis[None].double()).item()


RULES = {"fixed": {}, "budget": {"track_drift": True, "refresh_budget": 50, "fold_every": 2, "betas": (0.9, 0.95**2)}}
"""``--rule``: the drift check at every due refresh of T = 10, or the race's budgeted levers on top of it."""


def trained(steps: int, task_options: dict | None = None, tolerance: float = 0.2,
            rule: str = "fixed") -> Iterator[tuple[int, torch.optim.Optimizer, dict[torch.Tensor, str]]]:
    """Train the task's model with KL-Shampoo (lr 4e-3, staggered T = 10, ``drift_tolerance``, ``RULES[rule]``)
    and yield ``(step, optimizer, parameter names)`` after each of the ``steps`` steps (seed 0 throughout)."""
    torch.manual_seed(0)
    task = make_task("char_lm", task_options or TASK)
    data = task.load(torch.device("cpu"))
    model = task.build_model(0)
    names = {p: n for n, p in model.named_parameters()}
    optimizer = precond.kl_shampoo(model.parameters(), lr=4e-3, stagger=True, drift_tolerance=tolerance,
                                   weight_decay=0.1, **RULES[rule])
    batches = stream(data, torch.Generator().manual_seed(0))
    for step in range(1, steps + 1):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step, optimizer, names


def measure(steps: int, task_options: dict | None = None, tolerance: float = 0.2, rule: str = "fixed",
            refine: bool = False, refine_precision: str = "tf32", sweeps: int = 2) -> str:
    """The two Markdown tables (module docstring) after ``steps`` training steps; ``rule`` and ``refine`` as there."""
    refiner = bases.Refine(every=10, precision=refine_precision, sweeps=sweeps)
    bases_before: dict[tuple, torch.Tensor] = {}
    ratio_before: dict[tuple, float] = {}
    refreshes = collections.defaultdict(list)  # mode size → (r before, r after, r after with p = 2[, Refine, kept])
    trace = collections.defaultdict(list)  # mode size → r after each step of the second half
    for step, optimizer, names in trained(steps, task_options, tolerance, rule):
        for param, state in optimizer.state.items():
            if param.dim() != 2 or "Q" not in state.get("basis", {}):
                continue
            for mode, basis in state["basis"]["Q"].items():
                factor, key, size = state["estimator"]["S"][mode], (names[param], mode), basis.shape[-1]
                ratio = _ratio(factor, basis)
                old = bases_before.get(key)
                if old is not None and not torch.equal(old, basis) and key in ratio_before:
                    squared = power_step(factor.float(), old.float(), power=2)
                    row = (ratio_before[key], ratio, _ratio(factor, squared))
                    if refine:
                        refined = refiner.refresh(factor[None].float(), old[None].float()).basis[0]
                        row += (_ratio(factor, refined), float(torch.equal(refined, old.float())),
                                root_error(factor, basis), root_error(factor, refined))
                    refreshes[size].append(row)
                if step > steps // 2:
                    trace[size].append(ratio)
                ratio_before[key], bases_before[key] = ratio, basis.clone()
    title = f"{steps} steps, τ = {tolerance}, rule {rule}"
    if refine:
        title += f", Refine: {sweeps} sweeps, {refine_precision} products"
    return "\n".join([title, "", *_refresh_table(refreshes, refine), "", *_trace_table(trace, tolerance)])


def _refresh_table(refreshes: dict[int, list[tuple]], refine: bool) -> list[str]:
    """One row per mode size: the mean of each column over its refreshes (Refine's refusals as a count)."""
    head = "| mode size | refreshes | r before | r after | r after with p = 2 |"
    if refine:
        head += " r after Refine | Refine kept the old basis | root error after | root error after Refine |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for size, rows in sorted(refreshes.items()):
        mean = [sum(row[i] for row in rows) / len(rows) for i in range(len(rows[0]))]
        line = f"| {size} | {len(rows)} | " + " | ".join(f"{value:.3f}" for value in mean[:3]) + " |"
        if refine:
            line += f" {mean[3]:.3f} | {round(mean[4] * len(rows))} | {mean[5]:.3f} | {mean[6]:.3f} |"
        lines.append(line)
    return lines


def _trace_table(trace: dict[int, list[float]], tolerance: float) -> list[str]:
    """One row per mode size: the mean ``r`` over the second half and how often it reached ``τ``."""
    lines = ["| mode size | mean r (second half) | fraction of steps with r ≥ τ |", "|---|---|---|"]
    for size, ratios in sorted(trace.items()):
        above = sum(r >= tolerance for r in ratios) / len(ratios)
        lines.append(f"| {size} | {sum(ratios) / len(ratios):.3f} | {above:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m precond.bench.refresh_drift", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tolerance", type=float, default=0.2)
    parser.add_argument("--rule", choices=sorted(RULES), default="fixed")
    parser.add_argument("--refine", action="store_true", help="also what bases.Refine would leave at each refresh")
    parser.add_argument("--refine-precision", choices=bases.refine.PRECISIONS, default="tf32",
                        help="operand precision of Refine's products (its default: tf32, emulated on the CPU)")
    parser.add_argument("--sweeps", type=int, default=2, help="Refine's sweeps per refresh")
    parser.add_argument("--width", type=int, default=TASK["width"], help="the model's width (modes of 1× and 4×)")
    args = parser.parse_args(argv)
    print(measure(args.steps, {**TASK, "width": args.width}, tolerance=args.tolerance, rule=args.rule,
                  refine=args.refine, refine_precision=args.refine_precision, sweeps=args.sweeps))


if __name__ == "__main__":
    main()
