"""Runs of registry entries on the battery's problem, the verdict of the compatibility table for a mode, and the
round-off tolerance of each entry.

**Tolerance of a round-off promise.** Two paths that promise "the same updates to round-off" (``stack=False``, the
emulated captured step) compute the same formulas with other groupings (batched or single matmuls, bias
corrections on the device): each intermediate may differ by a few units of round-off ``ε = 2⁻⁵²`` (float64, the
battery's dtype), and the optimizer's own dynamics amplify what it is given. The amplification is measured, not
guessed: :func:`sensitivity` is the largest parameter change of the reference run when every gradient entry is
perturbed by one unit of round-off (relative ``±ε``, random signs) at every step. A product or sum over ``n`` terms
rounds with an error of at most ``n·ε`` relative, and the longest reduction of the problem is over the 8 examples of
a batch (each viewed mode is ≤ 7), so a path that rounds differently is held to ``K = 16`` times the sensitivity
(twice the longest reduction: the rotation into the eigenbasis and back), and never below ``K·ε·max|θ|`` (one
rounding of the parameters themselves, for runs whose sensitivity happens to round to 0). An entry is usable for
such comparisons only when that tolerance is far below a real change: :func:`well_conditioned` asks for
``K·sensitivity ≤ 10⁻⁶·lr``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

import precond
from precond import compatibility
from tests import registry
from tests.battery_modes import BY_NAME, Mode
from tests.battery_problem import DTYPE, LR, STEPS, make_model, parameters, train

EPS = torch.finfo(DTYPE).eps
K = 16
"""Round-off units a differently rounded path may add per gradient-sized perturbation (module docstring)."""


def build(entry: registry.Entry, model: nn.Module, mode: Mode) -> precond.Optimizer:
    return entry.build(model, mode.keywords())


def trained(entry: registry.Entry, mode: Mode, steps: range = range(1, STEPS + 1),
            corrupt: Any = None) -> tuple[nn.Module, precond.Optimizer]:
    """A fresh model and ``entry``'s optimizer in ``mode``, trained over ``steps``."""
    model = make_model()
    optimizer = build(entry, model, mode)
    train(model, optimizer, steps, corrupt)
    return model, optimizer


@functools.cache
def final(entry_name: str, mode_name: str) -> dict[str, torch.Tensor]:
    """Parameters after ``STEPS`` steps of one process (cached: the references of many comparisons)."""
    model, optimizer = trained(registry.entry(entry_name), BY_NAME[mode_name])
    release(optimizer)
    return parameters(model)


def release(optimizer: torch.optim.Optimizer) -> None:
    """Remove the module hooks an entry put on its model (K-FAC's capture)."""
    capture = getattr(optimizer, "kfac_capture", None)
    if capture is not None:
        capture.remove()


def _perturb(model: nn.Module, step: int) -> None:
    """Every gradient entry times ``1 ± ε`` (signs from a generator seeded by the step)."""
    gen = torch.Generator().manual_seed(10_000 + step)
    for p in model.parameters():
        if p.grad is not None:
            signs = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
            p.grad.mul_(1 + EPS * signs)


@functools.cache
def sensitivity(entry_name: str) -> float:
    """Largest parameter change after ``STEPS`` steps when every gradient entry is off by one unit of round-off."""
    model, optimizer = trained(registry.entry(entry_name), BY_NAME["plain"], corrupt=_perturb)
    release(optimizer)
    reference = final(entry_name, "plain")
    return max((p.detach() - reference[name]).abs().max().item() for name, p in model.named_parameters())


def tolerance(entry_name: str) -> float:
    """Absolute tolerance of a round-off promise for ``entry_name`` (module docstring)."""
    scale = max(p.abs().max().item() for p in final(entry_name, "plain").values())
    return K * max(sensitivity(entry_name), EPS * scale)


def well_conditioned(entry_name: str) -> bool:
    return K * sensitivity(entry_name) <= 1e-6 * LR


def largest_differences(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                        names: Optional[list[str]] = None) -> dict[str, float]:
    """``{name: max |run − reference|}`` (infinite where dtype or shape differ)."""
    out = {}
    for name in reference if names is None else names:
        a, b = run[name], reference[name]
        out[name] = float("inf") if (a.dtype, a.shape) != (b.dtype, b.shape) else (a - b).abs().max().item()
    return out


@functools.cache
def replayed(entry_name: str, mode_name: str, reference_name: str) -> tuple[dict[str, torch.Tensor], ...]:
    """The run of ``mode`` (recording its gradients), and the ``reference`` mode stepped with exactly those
    gradients: where the two modes differ in some parameters (``large="block"`` cuts some), the others still get
    the same gradients, so their promise can be checked on a model whose parameters are coupled."""
    entry, recorded = registry.entry(entry_name), {}

    def record(model: nn.Module, step: int) -> None:
        recorded[step] = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}

    model, optimizer = trained(entry, BY_NAME[mode_name], corrupt=record)
    release(optimizer)
    twin = make_model()
    twin_optimizer = build(entry, twin, BY_NAME[reference_name])
    for step in range(1, STEPS + 1):
        for name, p in twin.named_parameters():
            p.grad = recorded[step][name]
        twin_optimizer.step()
    release(twin_optimizer)
    return parameters(model), parameters(twin)


def uncut(entry: registry.Entry, mode: Mode) -> list[str]:
    """Names of the parameters ``mode`` does not cut into blocks (all of them without ``large="block"``)."""
    model = make_model()
    optimizer = build(entry, model, BY_NAME["block"]) if mode.blocks else None
    if optimizer is None:
        return [name for name, _ in model.named_parameters()]
    release(optimizer)
    cut = {id(p) for group in optimizer.param_groups for p in group["params"]
           if group["preconditioner"].blocks(p.shape) is not None}
    return [name for name, p in model.named_parameters() if id(p) not in cut]


# --- the table's verdict ---------------------------------------------------------------------------------------
@functools.cache
def not_offered(entry_name: str, blocks: bool) -> Optional[str]:
    """Why the entry has no such mode (None if it has): only ``large="block"`` is not offered by every entry."""
    return registry.blockable(registry.entry(entry_name), make_model()) if blocks else None


@functools.cache
def _structure(entry_name: str, blocks: bool) -> Any:
    """The rule that refuses the entry built with the structure option alone (``large="block"`` or nothing), or
    the features of each of its param groups."""
    structural = {"state_dtype": DTYPE, **({"large": "block"} if blocks else {})}
    try:
        optimizer = registry.entry(entry_name).build(make_model(), structural)
    except compatibility.Incompatible as refused:
        return refused.rule
    release(optimizer)
    return [compatibility.group_features(group) for group in optimizer.param_groups]


def expected_refusal(entry_name: str, mode: Mode) -> Optional[compatibility.Rule]:
    """The rule of the compatibility table that refuses the entry in ``mode``, or None: the mode's option features
    with the features of each of the entry's param groups, built with the mode's structure option alone (a refusal
    of that build is the answer, e.g. ``large="block"`` on a structure that cuts no blocks)."""
    groups = _structure(entry_name, mode.blocks)
    if isinstance(groups, compatibility.Rule):
        return groups
    options = mode.features()
    verdicts = [compatibility.refusal(options)]  # the constructor's order: its options, then each group
    verdicts += [compatibility.refusal(options | features) for features in groups]
    return next((rule for rule in verdicts if rule is not None), None)


@functools.cache
def verdict(entry_name: str, mode_name: str) -> tuple[str, Any]:
    """``("not offered", why)``, ``("refused", rule)`` or ``("runs", None)`` for an entry in a mode."""
    mode = BY_NAME[mode_name]
    why = not_offered(entry_name, mode.blocks)
    if why is not None:
        return "not offered", why
    rule = expected_refusal(entry_name, mode)
    return ("refused", rule) if rule is not None else ("runs", None)
