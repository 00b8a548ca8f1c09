"""precond: second-order optimizers assembled from a structure, an estimator, a basis refresher and an applier.

>>> import precond, structures, estimators, bases
>>> opt = precond.Optimizer(model.parameters(), lr=3e-4, momentum=0.9,
...     preconditioner=precond.Preconditioner(
...         structure=structures.NMode(max_dim=4096), estimator=estimators.KL(beta=0.95),
...         basis=bases.QRPowerStep(every=10), applier=precond.Power(p=0.5, eps=1e-8)))

The public names are resolved on first use (PEP 562), so the part packages can import ``precond.layout``,
``precond.contractions`` and ``precond.fallbacks`` without an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

PRESETS = ("eshampoo", "idealized_kl_shampoo", "kl_shampoo", "kl_soap", "one_sided_shampoo", "shampoo", "soap")

_PUBLIC = {
    "DataParallel": "precond.distributed",
    "Graft": "precond.appliers",
    "Layout": "precond.layout",
    "Normalize": "precond.appliers",
    "Optimizer": "precond.optimizer",
    "Power": "precond.appliers",
    "Preconditioner": "precond.preconditioner",
    **{name: "precond.presets" for name in PRESETS},
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
