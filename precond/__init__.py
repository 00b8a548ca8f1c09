"""precond: second-order optimizers assembled from a structure, an estimator, a basis refresher and an applier.

>>> import precond, structures, estimators, bases
>>> opt = precond.Optimizer(model.parameters(), lr=3e-4, momentum=0.9,
...     preconditioner=precond.Preconditioner(
...         structure=structures.NMode(max_dim=4096), estimator=estimators.KL(beta=0.95),
...         basis=bases.QRPowerStep(every=10), applier=precond.Power(p=0.5, eps=1e-8)))

The public names are resolved on first use (PEP 562), so the part packages can import ``precond.layout``,
``precond.contractions`` and ``precond.fallbacks`` without an import cycle. Importing ``precond`` puts the part
classes on torch's safe globals (``precond.safe_globals``), so ``param_groups`` pickled with their live parts load with
``torch.load(..., weights_only=True)`` (Lightning's checkpoints).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

PRESETS = ("eshampoo", "idealized_kl_shampoo", "kl_shampoo", "kl_soap", "muon", "one_sided_shampoo", "shampoo", "soap")
"""Presets called with parameters: ``precond.soap(model.parameters(), lr=...)``."""

MODEL_PRESETS = ("ekfac", "kfac")
"""Presets called with the model, whose modules they hook: ``precond.kfac(model, lr=...)``."""

PRESET_CLASSES = {"eshampoo": "EShampoo", "idealized_kl_shampoo": "IdealizedKLShampoo", "kl_shampoo": "KLShampoo",
                  "kl_soap": "KLSOAP", "muon": "Muon", "one_sided_shampoo": "OneSidedShampoo", "shampoo": "Shampoo",
                  "soap": "SOAP"}
"""The preset classes (``torch.optim.Optimizer`` subclasses) by the lower-case name that is another name of the same
class. All take ``params, lr, betas, weight_decay, eps, every, max_dim, **options`` but ``Muon``, whose two parts
take ``params, lr, momentum, nesterov, weight_decay, …, adam_lr, adam_betas, …, adam_params, **options``."""

_PUBLIC = {
    "DataParallel": "precond.distributed",
    "Graft": "precond.appliers",
    "KFACCapture": "precond.kfac_capture",
    "Layout": "precond.layout",
    "NewtonSchulz": "precond.appliers",
    "Normalize": "precond.appliers",
    "Optimizer": "precond.optimizer",
    "Polar": "precond.appliers",
    "Power": "precond.appliers",
    "Preconditioner": "precond.preconditioner",
    **{name: "precond.presets" for name in (*PRESETS, *MODEL_PRESETS, *PRESET_CLASSES.values())},
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'precond' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


def _allow_parts_in_weights_only_loads() -> None:
    from precond.safe_globals import allow_library_parts

    allow_library_parts()


_allow_parts_in_weights_only_loads()
