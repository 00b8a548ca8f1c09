"""precond: second-order optimizers assembled from a structure, an estimator, a basis refresher and an applier.

>>> import precond, structures, estimators, bases
>>> opt = precond.Optimizer(model.parameters(), lr=3e-4, momentum=0.9,
...     preconditioner=precond.Preconditioner(
...         structure=structures.NMode(max_dim=4096), estimator=estimators.KL(beta=0.95),
...         basis=bases.QRPowerStep(every=10), applier=precond.Power(p=0.5, eps=1e-8)))
"""

from precond.appliers import Power
from precond.layout import Layout
from precond.optimizer import Optimizer
from precond.preconditioner import Preconditioner
from precond.presets import kl_shampoo, shampoo

__all__ = ["Layout", "Optimizer", "Power", "Preconditioner", "kl_shampoo", "shampoo"]
__version__ = "0.1.0"
