"""Pieces shared by the estimators: the EMA weight field, mode sums, the spectrum floor, column permutation."""

from __future__ import annotations

from typing import Optional, Union

import attrs
import torch

from precond.validators import number, plain_number

beta_field = attrs.field(default=0.95, converter=plain_number,
                         validator=number(low=0, high=1, meaning="EMA weight ρ on the old statistic"))


def sum_except(x: torch.Tensor, k: int) -> torch.Tensor:
    """Entries summed over every mode but ``k`` → ``(B, d_k)``."""
    dims = tuple(j + 1 for j in range(x.ndim - 1) if j != k)
    return x.sum(dim=dims) if dims else x


def sum_of_squares_except(x: torch.Tensor, k: int) -> torch.Tensor:
    """``diag(Gram_k(X))``: squares summed over every mode but ``k`` → ``(B, d_k)``."""
    return sum_except(x * x, k)


FloorSpec = Union[str, float]


def spectrum_floor(spec: FloorSpec, d_k: int) -> float:
    """Lower bound on ``λ_k``. ``"dimension"``: the KL prototype's clamp ``λ^{-1/2} ≤ max(10, min(d_k, 4000))``."""
    if spec == "dimension":
        return float(max(10, min(d_k, 4000))) ** -2
    return float(spec)


floor_validator = number(low=0, also=("dimension",), meaning="lower bound on λ_k")


def permute_columns(vector: torch.Tensor, permutation: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-column state follows a basis permutation: ``new[i] = old[π[i]]``."""
    return vector if permutation is None else torch.gather(vector, -1, permutation)
