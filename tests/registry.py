"""The registry of everything the battery (``tests/test_battery.py``) runs, built from the package's exports.

One entry per preset (``precond.PRESETS``, ``precond.MODEL_PRESETS``) and per exported part class of every slot
(``structures.__all__``, ``estimators.__all__``, ``bases.__all__`` and the appliers ``precond.appliers.__all__``),
as PyTorch's ``optim_db`` and optax's list of optimizers under test. A new preset or part enters the battery by
being exported; what a part needs here is a *recipe*, the small way to construct it (``PART_RECIPES``; a preset
needs an entry in ``PRESET_ARGUMENTS`` only if it does not take ``every`` and ``max_dim``), and :func:`missing` names
every export without one (a test fails with that list).

A part is run inside an otherwise fixed composition (``COMPANIONS``: ``NMode`` · ``KL`` · ``Eigh`` ·
``Power(½)``), replacing the companion of its slot; a recipe may also replace companions the part cannot work
without (``NewtonSchulz`` needs ``Matrix``'s view and no statistics). Parameters the composition cannot take
(vectors for a matrix-only part, the layers a K-FAC estimator does not capture) go to a second group with the
companions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import attrs
import torch
from torch import nn

import bases
import estimators
import precond
import structures
from precond import appliers
from tests.battery_problem import EVERY, LR, MAX_DIM

Build = Callable[[nn.Module, dict[str, Any]], precond.Optimizer]
SLOTS = {"structure": structures, "estimator": estimators, "basis": bases, "applier": appliers}

COMPANIONS: dict[str, Callable[[], Any]] = {
    "structure": lambda: structures.NMode(max_dim=MAX_DIM),
    "estimator": lambda: estimators.KL(beta=0.9),
    "basis": lambda: bases.Eigh(every=EVERY),
    "applier": lambda: precond.Power(p=0.5, eps=1e-8),
}
"""The composition every part runs in (each slot's companion, replaced by the part of that slot)."""

NOT_PARTS = {
    "estimators.Estimator": "the base class of the estimators (its update() is abstract); every estimator is one",
    "precond.appliers.Exponent": "a type alias (the exponent p of Power), not an applier",
}
"""Exports that are not parts to run, and why (an entry of the registry that builds nothing)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to run a part: ``make(model)`` gives it (a model, for parts that hook one); ``companions`` replace the
    fixed ones it cannot work without; ``takes`` says which parameters the composition gets (the rest get
    :data:`COMPANIONS`): ``"all"``, ``"matrices"`` (two or more dimensions) or ``"captured"`` (a K-FAC capture's
    layers: ``make`` returns ``(part, capture)``)."""

    make: Callable[[nn.Module], Any]
    companions: Mapping[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    takes: str = "all"


def _power() -> precond.Power:
    return precond.Power(p=0.5, eps=1e-8)


def _kfac(spectrum: bool) -> Callable[[nn.Module], Any]:
    def make(model: nn.Module) -> tuple[Any, precond.KFACCapture]:
        capture = precond.KFACCapture(model)
        return (estimators.EKFAC(capture, beta=0.9) if spectrum else estimators.KFAC(capture, beta=0.9)), capture
    return make


_SHAMPOO_POWER = {"estimator": lambda: estimators.Shampoo(beta=0.9), "applier": lambda: precond.Power(p=0.5, eps=1e-4)}
"""LayerMatrix keeps a layer's bias as a dense mode, whose KL factor is ill-conditioned on few steps: Shampoo's
grams with a larger ε instead."""
_MUON_VIEW = {"structure": structures.Matrix, "estimator": estimators.Stateless, "basis": bases.Identity}

PART_RECIPES: dict[str, Recipe] = {
    "structures.Diagonal": Recipe(lambda m: structures.Diagonal()),
    "structures.Kronecker": Recipe(lambda m: structures.Kronecker(max_dim=MAX_DIM)),
    "structures.LayerMatrix": Recipe(lambda m: structures.LayerMatrix(max_dim=MAX_DIM), _SHAMPOO_POWER),
    "structures.Matrix": Recipe(lambda m: structures.Matrix(), takes="matrices"),
    "structures.NMode": Recipe(lambda m: structures.NMode(max_dim=MAX_DIM)),
    "structures.OneSided": Recipe(lambda m: structures.OneSided(max_dim=MAX_DIM)),
    "estimators.DenseSpectrum": Recipe(lambda m: estimators.DenseSpectrum(estimators.KL(beta=0.9), beta=0.9)),
    "estimators.EKFAC": Recipe(_kfac(True), {"structure": lambda: structures.LayerMatrix(max_dim=MAX_DIM),
                                             "applier": lambda: precond.Power(p=1.0, eps=1e-3)}, "captured"),
    "estimators.Frobenius": Recipe(lambda m: estimators.Frobenius(beta=0.9)),
    "estimators.KFAC": Recipe(_kfac(False), {"structure": lambda: structures.LayerMatrix(max_dim=MAX_DIM),
                                             "applier": lambda: precond.Power(p=1.0, eps=1e-3)}, "captured"),
    "estimators.KL": Recipe(lambda m: estimators.KL(beta=0.95, refresh_spectrum="reset")),
    "estimators.Shampoo": Recipe(lambda m: estimators.Shampoo(beta=0.9, spectrum="every_step"),
                                 {"applier": lambda: precond.Graft(_power(), onto="adam")}),
    "estimators.Stateless": Recipe(lambda m: estimators.Stateless(),
                                   {**_MUON_VIEW, "applier": lambda: precond.NewtonSchulz()}, "matrices"),
    "bases.CholeskyQR": Recipe(lambda m: bases.CholeskyQR(every=EVERY, warmup=1, precision="float64")),
    "bases.Eigh": Recipe(lambda m: bases.Eigh(every=EVERY)),
    "bases.Identity": Recipe(lambda m: bases.Identity()),
    "bases.QRPowerStep": Recipe(lambda m: bases.QRPowerStep(every=EVERY, sort=True, power=2)),
    "bases.Refine": Recipe(lambda m: bases.Refine(every=EVERY, sort=True)),
    "precond.appliers.Graft": Recipe(lambda m: precond.Graft(_power(), onto="adam")),
    "precond.appliers.NewtonSchulz": Recipe(lambda m: precond.NewtonSchulz(), _MUON_VIEW, "matrices"),
    "precond.appliers.Normalize": Recipe(lambda m: precond.Normalize(_power(), rms=0.2)),
    "precond.appliers.Polar": Recipe(lambda m: precond.Polar(_power(), precond.NewtonSchulz(dtype=torch.float64))),
    "precond.appliers.Power": Recipe(lambda m: precond.Power(p=0.25, eps=1e-6, eps_placement="outside")),
}
"""Every exported part class: how to construct it (``NOT_PARTS`` lists the exports that are no part)."""

PRESET_ARGUMENTS: dict[str, dict[str, Any]] = {
    "kfac": {"every": EVERY, "max_dim": MAX_DIM},
    "ekfac": {"every": EVERY, "max_dim": MAX_DIM},
    "muon": {},
    "eshampoo": {"every": EVERY, "max_dim": MAX_DIM, "eps": 1e-6},
}
"""Keywords beyond ``lr`` for the presets that do not take ``every``/``max_dim`` the common way (the others get
``every=EVERY, max_dim=MAX_DIM``): ``muon`` has neither (no factors, no refreshes). ``eshampoo`` runs with ε = 1e-6:
it uses its first gradient at once, and Adam's first step in the eigenbasis is ``R/(√R² + ε)``, so an entry of
``R`` that is float64 round-off (a direction the battery's few gradients never touched) becomes round-off divided by
ε. With its default (Meta's ε = 1e-12; the round-off floor bounds the step, ``tests/test_safe_defaults.py``) one
ulp in the gradients moves the parameters by ~1e-4, with 1e-8 by ~1e-8: no round-off comparison of its modes could
mean anything (``test_entry_is_well_conditioned``)."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One preset or part: ``build(model, options)`` gives its optimizer over ``model`` with ``options`` (the
    optimizer's keywords; ``large`` is the structure's, see :func:`blockable`)."""

    name: str
    kind: str
    build: Build


def exported_parts() -> list[str]:
    """``module.Name`` of every export of the part packages."""
    return [f"{module.__name__}.{name}" for module in SLOTS.values() for name in module.__all__]


def missing() -> list[str]:
    """Exported presets and parts the registry cannot build (no recipe): each must be added to ``PART_RECIPES``
    (or ``NOT_PARTS``, with the reason)."""
    return [name for name in exported_parts() if name not in PART_RECIPES and name not in NOT_PARTS]


def _slot_of(part: Any) -> str:
    """The slot a part fills: the part package that exports its class."""
    for slot, module in SLOTS.items():
        if type(part).__name__ in module.__all__ and getattr(module, type(part).__name__) is type(part):
            return slot
    for slot, module in SLOTS.items():  # a factory function (estimators.Frobenius) returns another export's class
        if any(isinstance(part, getattr(module, name)) for name in module.__all__
               if isinstance(getattr(module, name), type) and f"{module.__name__}.{name}" not in NOT_PARTS):
            return slot
    raise TypeError(f"{part!r} is no part of any slot")


def _with_large(structure: Any, large: Optional[str]) -> Any:
    """``structure`` with the ``large`` policy asked for, where it has that policy (``"block"``: ``NMode``)."""
    if large is None:
        return structure
    try:
        return attrs.evolve(structure, large=large)
    except (TypeError, ValueError):  # no such field, or no such policy
        return structure


def _part_build(name: str, recipe: Recipe) -> Build:
    def build(model: nn.Module, options: dict[str, Any]) -> precond.Optimizer:
        options = dict(options)
        large = options.pop("large", None)
        made = recipe.make(model)
        part, capture = made if recipe.takes == "captured" else (made, None)
        chosen = {slot: make() for slot, make in COMPANIONS.items()}
        chosen.update({slot: make() for slot, make in recipe.companions.items()})
        chosen[_slot_of(part)] = part
        chosen["structure"] = _with_large(chosen["structure"], large)
        rest = {slot: make() for slot, make in COMPANIONS.items()}
        rest["structure"] = _with_large(rest["structure"], large)
        named = list(model.named_parameters())
        if recipe.takes == "captured":
            taken = {id(p) for p in capture.params}
            mine = [(n, p) for n, p in named if id(p) in taken]
        elif recipe.takes == "matrices":
            mine = [(n, p) for n, p in named if p.ndim >= 2]
        else:
            mine = named
        others = [(n, p) for n, p in named if all(p is not q for _, q in mine)]
        groups: list[dict[str, Any]] = [{"params": mine}]
        if others:
            groups.append({"params": others, "preconditioner": precond.Preconditioner(**rest)})
        try:
            optimizer = precond.Optimizer(groups, preconditioner=precond.Preconditioner(**chosen), lr=LR,
                                          momentum=0.9, **options)
        except BaseException:
            if capture is not None:
                capture.remove()
            raise
        if capture is not None:
            capture.attach(optimizer)
            optimizer.kfac_capture = capture
        return optimizer

    build.__qualname__ = f"build[{name}]"
    return build


def _preset_build(name: str) -> Build:
    factory = getattr(precond, name)
    takes_model = name in precond.MODEL_PRESETS
    arguments = PRESET_ARGUMENTS.get(name, {"every": EVERY, "max_dim": MAX_DIM})

    def build(model: nn.Module, options: dict[str, Any]) -> precond.Optimizer:
        params = model if takes_model else list(model.named_parameters())
        return factory(params, lr=LR, **arguments, **options)

    build.__qualname__ = f"build[{name}]"
    return build


def entries() -> list[Entry]:
    """Every preset and every part with a recipe, in export order."""
    out = [Entry(f"preset.{name}", "preset", _preset_build(name)) for name in (*precond.PRESETS,
                                                                                 *precond.MODEL_PRESETS)]
    out += [Entry(name, "part", _part_build(name, PART_RECIPES[name])) for name in exported_parts()
            if name in PART_RECIPES]
    return out


def entry(name: str) -> Entry:
    return next(e for e in entries() if e.name == name)


def blockable(entry: Entry, model: nn.Module) -> Optional[str]:
    """Why ``entry`` offers no ``large="block"`` (None if it does): a preset must take the keyword ``large``, and
    with it some parameter of the model must be cut into blocks (or the combination refused at construction)."""
    try:
        optimizer = entry.build(model, {"large": "block"})
    except TypeError as error:
        if entry.kind == "preset" and "large" in str(error):
            return f"{entry.name} takes no large= (its structures have no blocks to cut)"
        raise
    except ValueError:  # refused at construction: the battery checks that the compatibility table says so
        return None
    _remove_hooks(optimizer)
    if not any(group["preconditioner"].blocks(p.shape) is not None
               for group in optimizer.param_groups for p in group["params"]):
        kinds = sorted({type(group["preconditioner"].structure).__name__ for group in optimizer.param_groups})
        return f"{entry.name} runs with {', '.join(kinds)}: large='block' cuts no parameter of the model"
    return None


def _remove_hooks(optimizer: torch.optim.Optimizer) -> None:
    capture = getattr(optimizer, "kfac_capture", None)
    if capture is not None:
        capture.remove()
