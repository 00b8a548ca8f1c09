"""The contract between a basis refresher and an estimator: what one refresh of a mode's basis returns."""

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

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in self.tensors_with_gaps() if t is not None)

    def tensors_with_gaps(self) -> tuple[Optional[torch.Tensor], ...]:
        """``(basis, eigenvalues, permutation)``, ``None`` where absent: the fields in order."""
        return self.basis, self.eigenvalues, self.permutation


def rayleigh_quotients(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``diag(Qᵀ S Q)``, batched: ``(B, d)``."""
    return torch.einsum("bij,bik,bkj->bj", basis, factor, basis)


def is_due(step: int, offset: int, every: int) -> bool:
    """The one rule for when a basis refresh is due: after the update of step ``t`` when ``(t + o) mod T = 0``
    (``o`` the unit's offset, 0 without stagger)."""
    return (step + offset) % every == 0


def refresh_index(step: int, offset: int, every: int) -> int:
    """0-based count of the refreshes of a unit up to and including the one due at ``step``."""
    return (step + offset) // every - 1
