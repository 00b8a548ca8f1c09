"""Pieces shared by the estimators: the EMA field, the fold rule and validators."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import attrs
import torch

from precond.layout import Layout

Tensors = list[Optional[torch.Tensor]]


def _beta(instance, attribute, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} (EMA weight ρ on the old statistic) must lie in [0, 1], got {value!r}")


beta_field = attrs.field(default=0.95, validator=_beta)


def fold_weights(beta: float, active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B,)`` weights of the new term for :func:`fold`: ``1−β`` (or 1 for a sum) where ``active``, else 0.

    ``active`` is False for an all-zero gradient, whose statistics are skipped (DESIGN: zero gradients must not
    decay λ). Computed once per update and shared by every fold of it.
    """
    return active.to(dtype) * (1.0 if beta == 1.0 else 1.0 - beta)


def fold(old: torch.Tensor, new: torch.Tensor, beta: float, weights: torch.Tensor) -> None:
    """In place: ``old ← β old + (1−β) new`` per batch entry, with ``weights`` from :func:`fold_weights`.

    ``β = 1`` accumulates the plain sum ``old ← old + new`` (original Shampoo/AdaGrad).
    """
    weight = weights.view(weights.shape[0], *([1] * (old.ndim - 1)))
    if beta == 1.0:
        old.addcmul_(new, weight)
    else:
        old.lerp_(new, weight)


def nonzero_gradient(grad: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the gradient of each batch entry has a nonzero entry (no host sync)."""
    return grad.reshape(grad.shape[0], -1).abs().amax(dim=1) > 0


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


def floor_validator(instance, attribute, value) -> None:
    if value == "dimension":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{attribute.name} must be 'dimension' or a number ≥ 0, got {value!r}")


def empty_state(layout: Layout, needs_factors: bool, batch: int, dtype: torch.dtype, device: torch.device,
                spectrum_fill: float) -> tuple[Tensors, Tensors]:
    """Zero factors for dense modes (when the basis needs them) and ``spectrum_fill`` spectra."""
    factors: Tensors = [None] * layout.order
    spectra: Tensors = [None] * layout.order
    for k, (d, kind) in enumerate(zip(layout.view_shape, layout.kinds)):
        if kind == "dense" and needs_factors:
            factors[k] = torch.zeros(batch, d, d, dtype=dtype, device=device)
        if kind != "none":
            spectra[k] = torch.full((batch, d), spectrum_fill, dtype=dtype, device=device)
    return factors, spectra


def permute_columns(vector: torch.Tensor, permutation: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-column state follows a basis permutation: ``new[i] = old[π[i]]``."""
    return vector if permutation is None else torch.gather(vector, -1, permutation)


def modes_with(items: Sequence[Optional[torch.Tensor]]) -> list[int]:
    return [k for k, item in enumerate(items) if item is not None]
