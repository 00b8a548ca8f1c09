"""The workbench's one table of part names: every name a composition may use, and how it builds its part.

``PARTS[slot][name](options)`` builds the part called ``name`` for ``slot`` from a variant's resolved options
(every key of :data:`precond.ablate.keys.READERS` present). The variant grammar's allowed values
(``keys.READERS``), ``--list`` and :func:`precond.ablate.build.make_preconditioner` all read this table, so a part
added here is reachable from the command line, a TOML file and Python at once.

Slots:

- ``structure``: which modes get a dense factor (``max_dim`` and the policy ``large`` for a mode above it);
- ``estimator``: how the factors and the spectrum absorb a gradient (β₂ is the estimator's EMA weight);
- ``basis``: how the eigenbasis is refreshed every ``every`` = T steps;
- ``graft``: the applier, ``Power(p, ε)`` (orthogonalised by ``Polar`` when ``polar`` names a scale, rescaled to RMS
  ``normalize`` by ``Normalize`` when that is set, as ASGO), given the step size of the named diagonal method
  (``Graft``) or, with ``none``, left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

import bases
import estimators
import precond
import structures

Options = Mapping[str, Any]
Builder = Callable[[Options], Any]

LARGE_MODES = ("none", "diagonal", "block")
"""What a structure gives a mode larger than ``max_dim``: nothing (identity), a diagonal spectrum, or blocks of
``max_dim`` with factors of their own (Meta's blocking, ``precond.blocking``)."""


def _structure(cls: type) -> Builder:
    return lambda o: cls(max_dim=o["max_dim"], large=o["large"])


def _basis(cls: type) -> Builder:
    def build(o: Options) -> Any:
        if o.get("basis_power", 1) != 1:
            raise ValueError(f"basis_power is the number of products of S in the qr refresh (bases.QRPowerStep); "
                             f"basis {cls.__name__} takes none: use basis=qr or leave basis_power out")
        return cls(every=o["every"])
    return build


def inner_applier(o: Options) -> Any:
    """``Power(p, ε)`` in the eigenbasis, orthogonalised by ``Polar`` (Muon's Newton–Schulz with the scale
    ``polar`` names) unless ``polar`` is ``none``, then wrapped in ``Normalize(·, rms)`` when ``normalize`` is an
    RMS."""
    applier: Any = precond.Power(p=o["applier"], eps=o["eps"], eps_placement=o["eps_placement"])
    if o.get("polar", "none") != "none":
        dtype = getattr(torch, o.get("polar_dtype", "bfloat16"))
        applier = precond.Polar(applier, precond.NewtonSchulz(scale=o["polar"], dtype=dtype))
    if o["normalize"] is not None:
        applier = precond.Normalize(applier, rms=o["normalize"])
    return applier


def _grafted(onto: str) -> Builder:
    return lambda o: precond.Graft(inner_applier(o), onto=onto)


def kl_options(o: Options) -> dict[str, Any]:
    """The ``KL`` estimator's options of a composition: ``β₂`` and, when given, ``init_lambda`` (``data``: None),
    ``floor`` and ``track_drift``."""
    chosen = o.get("init_lambda", 0.1)
    return {"beta": o["beta2"], "init_lambda": None if chosen == "data" else chosen,
            "floor": o.get("floor", "dimension"), "track_drift": o.get("track_drift", False)}


KL_ESTIMATORS = ("kl", "kl_soap")
"""The estimators that take ``init_lambda``, ``floor`` and ``track_drift``."""

PARTS: dict[str, dict[str, Builder]] = {
    "structure": {
        "nmode": _structure(structures.NMode),
        "kronecker": _structure(structures.Kronecker),
        "one_sided": _structure(structures.OneSided),
        "diagonal": lambda o: structures.Diagonal(),
    },
    "estimator": {
        "kl": lambda o: estimators.KL(**kl_options(o)),
        "shampoo": lambda o: estimators.Shampoo(beta=o["beta2"]),
        "frobenius": lambda o: estimators.Frobenius(beta=o["beta2"], spectrum="dense"),
        "frobenius_factored": lambda o: estimators.Frobenius(beta=o["beta2"], spectrum="factored"),
        "kl_soap": lambda o: estimators.DenseSpectrum(estimators.KL(**kl_options(o)), beta=o["beta2"],
                                                      bias_correction=False, transport="keep"),
    },
    "basis": {
        "eigh": _basis(bases.Eigh),
        "qr": lambda o: bases.QRPowerStep(every=o["every"], power=o.get("basis_power", 1)),
        "cholesky_qr": _basis(bases.CholeskyQR),
        "cholesky_qr64": lambda o: attrs.evolve(_basis(bases.CholeskyQR)(o), precision="float64",
                                                plain_passes=o.get("plain_passes", 2)),
        "refine": lambda o: attrs.evolve(_basis(bases.Refine)(o), sweeps=o.get("sweeps", 2)),
        "identity": lambda o: bases.Identity(),
    },
    "graft": {
        "adam": _grafted("adam"),
        "rmsprop": _grafted("rmsprop"),
        "sgd": _grafted("sgd"),
        "none": inner_applier,
    },
}
"""``PARTS[slot][name]``: the builder of every part a composition can name, by slot."""


def names(slot: str) -> tuple[str, ...]:
    """The names ``slot`` accepts, in the table's order."""
    return tuple(PARTS[slot])


def build(slot: str, options: Options) -> Any:
    """The part ``options[slot]`` names, built from ``options``."""
    return PARTS[slot][options[slot]](options)
