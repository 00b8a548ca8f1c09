"""Pieces shared by the basis refreshers: the validated ``every`` field and the all-zero-factor mask."""

from __future__ import annotations

import attrs
import torch

from precond.reductions import max_abs
from precond.validators import number, plain_number

every_field = attrs.field(default=10, converter=plain_number,
                          validator=number(low=1, integer=True, meaning="the refresh period T"))


def nonzero_factor(factor: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 1)`` mask: True where the factor has any nonzero entry (no host synchronisation)."""
    return max_abs(factor, (-2, -1), keepdim=True) > 0
