"""The estimator protocol, with no-op defaults for the optional hooks."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from bases import Refresh
from estimators._common import Tensors
from precond.layout import Layout


class Estimator:
    """What the :class:`precond.Preconditioner` calls, in this order, on every parameter:

    1. ``init_extras(grad, layout)`` once: extra state tensors (e.g. a dense second moment ``V``);
    2. ``update(grad, bases, spectra, factors, layout, first=True)`` once, the initial fill; then
       ``finish_init(spectra, factors, refreshes, layout)`` after the first bases;
    3. each step: ``prepare(grad, bases, extras, layout, step)`` (statistics the current direction must already
       see, e.g. SOAP's ``V``), the applier, ``update(grad, …)`` (pre-step bases and spectra, Jacobi), and at
       refresh steps ``on_refresh(k, refresh, spectra, factors, layout, extras)``;
    4. ``dense_spectrum(extras, step)``: a full-size spectrum for the applier, or ``None`` (Kronecker ``λ_k``).
    """

    def init_extras(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {}

    def prepare(self, grad: torch.Tensor, bases: Tensors, extras: dict[str, torch.Tensor], layout: Layout,
                step: int) -> None:
        return None

    def dense_spectrum(self, extras: dict[str, torch.Tensor], step: int) -> Optional[torch.Tensor]:
        return None

    def update(self, grad: torch.Tensor, bases: Tensors, spectra: Tensors, factors: Tensors, layout: Layout,
               first: bool = False) -> None:
        raise NotImplementedError

    def finish_init(self, spectra: Tensors, factors: Tensors, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        return None

    def on_refresh(self, k: int, refresh: Refresh, spectra: Tensors, factors: Tensors, layout: Layout,
                   extras: Optional[dict[str, torch.Tensor]] = None) -> None:
        return None
