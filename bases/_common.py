"""What a basis refresh returns, and the validated ``every`` field."""

from __future__ import annotations

from typing import Optional

import attrs
import torch


@attrs.frozen
class Refresh:
    """The transition of one refresh of a mode's basis (batched: leading axis ``B``).

    ``basis``: the new ``Q_k`` (columns are eigenvector estimates, descending order).
    ``eigenvalues``: exact eigenvalues in that order when the refresher computed them (``eigh``), else ``None``.
    ``permutation``: when columns of the *old* basis were reordered before the refresh, ``new_col[i] = old_col[π[i]]``;
    per-column state (``λ_k``, a dense spectrum) must be permuted with it. ``None`` means no reordering.
    """

    basis: torch.Tensor
    eigenvalues: Optional[torch.Tensor] = None
    permutation: Optional[torch.Tensor] = None

    def spectrum(self, factor: torch.Tensor) -> torch.Tensor:
        """Eigenvalue estimates in the new basis: the exact ones when computed, else ``diag(Q_newᵀ S Q_new)``."""
        return self.eigenvalues if self.eigenvalues is not None else rayleigh_quotients(factor, self.basis)


def rayleigh_quotients(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ S Q)``, batched: ``(B, d)``."""
    return torch.einsum("bij,bik,bkj->bj", basis, factor, basis)


def _positive_int(instance, attribute, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} (the refresh period T) must be an integer ≥ 1, got {value!r}")


every_field = attrs.field(default=10, validator=_positive_int)


def nonzero_factor(factor: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 1)`` mask: True where the factor has any nonzero entry (no host synchronisation)."""
    return factor.abs().amax(dim=(-2, -1), keepdim=True) > 0
