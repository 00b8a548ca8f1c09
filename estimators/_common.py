"""Pieces shared by the estimators: the EMA weight field, mode sums, the spectrum floor, column permutation."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Union

import attrs
import torch

from precond.validators import number, plain_number

if TYPE_CHECKING:
    from precond.layout import Layout

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


def spectrum_floor(spec: FloorSpec, layout: "Layout", k: int) -> float:
    """Lower bound on ``λ_k`` of mode ``k`` of ``layout``, with ``c_j = max(10, min(d_j, 4000))``:

    - ``"dimension"``: the KL prototype's clamp ``λ_k^{-1/2} ≤ c_k``, i.e. ``λ_k ≥ c_k^{-2}`` (yorkerlin/KL-Methods,
      ``max_clamp_value``). It is calibrated for a weight whose every mode has a spectrum: each ``λ_k`` then
      carries about the ``m``-th root of an entry's scale.
    - ``"product"``: the same bound on the product of every mode's ``λ``, ``∏_j λ_j ≥ ∏_j c_j^{-2}`` over all modes
      of the view, the share of the modes without a spectrum (identity: one-sided structures, modes above
      ``max_dim`` with ``large="none"``) split evenly among the ``m`` modes that have one:
      ``λ_k ≥ c_k^{-2} ∏_{j: none} c_j^{-2/m}``. Equal to ``"dimension"`` when every mode has a spectrum; where a
      mode has none, its ``λ_k`` carries that mode's scale too (one-sided KL: the whole ``E[g²]``, ~1e-8 on a small
      transformer, far below ``c_k^{-2}``), and the prototype's clamp would hold every ``λ_k`` at the floor.
    - a number: that absolute floor for every mode.
    """
    if spec not in ("dimension", "product"):
        return float(spec)
    floor = dimension_floor(layout.view_shape[k])
    if spec == "product":
        bare = [d for d, kind in zip(layout.view_shape, layout.kinds, strict=True) if kind == "none"]
        shares = len(layout.spectral_modes)
        floor *= math.prod(_clamp_bound(d) for d in bare) ** (-2.0 / shares)
    return floor


def dimension_floor(d: int) -> float:
    """The KL prototype's floor on ``λ`` of a mode of size ``d``: ``c^{-2}``, ``c = max(10, min(d, 4000))``."""
    return _clamp_bound(d) ** -2


def _clamp_bound(d: int) -> float:
    """``c = max(10, min(d, 4000))``, the prototype's bound on ``λ^{-1/2}`` for a mode of size ``d``."""
    return float(max(10, min(d, 4000)))


floor_validator = number(low=0, also=("dimension", "product"), meaning="lower bound on λ_k")


def permute_columns(vector: torch.Tensor, permutation: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-column state follows a basis permutation: ``new[i] = old[π[i]]``."""
    return vector if permutation is None else torch.gather(vector, -1, permutation)
