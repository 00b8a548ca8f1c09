"""``InnerApplier``: what an applier that wraps another (``Graft``, ``Normalize``, ``Polar``) takes from it."""

from __future__ import annotations

from typing import Any

import torch

from precond.layout import Layout


class InnerApplier:
    """The spectrum's exponent and the state of the wrapped applier ``self.inner``: a wrapper changes the direction
    the inner applier makes, not the power it applies nor the tensors it keeps (a wrapper with state of its own,
    ``Graft``, adds to :meth:`init_state`)."""

    __slots__ = ()  # the attrs subclasses keep their slots
    inner: Any

    def exponent(self, layout: Layout) -> float:
        return self.inner.exponent(layout)

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return self.inner.init_state(grad, layout)
