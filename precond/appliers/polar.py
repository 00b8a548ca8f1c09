"""``Polar``: another applier's direction replaced by its approximate polar factor (Muon's step after any
preconditioner)."""

from __future__ import annotations

import attrs
import torch

from precond.appliers._wrapper import InnerApplier
from precond.appliers.newton_schulz import NewtonSchulz
from precond.parts import Applier, ApplyContext, slot


@attrs.frozen
class Polar(InnerApplier):
    """``U ← s(A, B) · polar(P(M))`` for a matrix view ``A × B``: the inner applier's direction ``P(M)`` (e.g. KL's
    ``Q_L diag(λ_L+ε)^{-½} Q_Lᵀ M Q_R diag(λ_R+ε)^{-½} Q_Rᵀ`` from :class:`precond.Power`) orthogonalised by
    ``newton_schulz`` (:class:`precond.NewtonSchulz`: ``polar(X) = U Vᵀ`` for ``X = U Σ Vᵀ``, by its quintic
    iteration, Eq. (1)–(2) there, and its ``scale``).

    Muon is ``Polar`` of the identity: ``polar(M)``, the steepest descent direction under the spectral norm
    (Bernstein & Newhouse 2024). Here the momentum is first whitened by the inner applier's factors: with
    :class:`precond.Power` in the eigenbases, ``polar(⊗_k Q_k diag(λ_k + ε)^{-p} Q_kᵀ M)``, the spectral-norm
    steepest direction in the geometry the factors define (Shampoo's grams with ``p = ¼`` give
    ``polar(L^{-¼} M R^{-¼})``). The polar factor keeps the singular vectors of the whitened direction and sets every
    singular value to 1 (then ``scale``). KL-Shampoo's factors with this step are one of the compositions of the
    composition search (``docs/results.md``, issue 26, part 4); public experiments have orthogonalised SOAP's update.

    - Only matrix views (layout order 2: linear layers, embeddings and heads) are orthogonalised; vectors (biases,
      norm scales) and views of order 3 and more keep the inner direction. Orthogonalising them would need a matrix
      view (:class:`structures.Matrix`, as ``precond.muon`` does); a bias's inner direction keeps its own scale, so
      give vectors AdamW's step in a group of their own where the two scales differ much.
    - The inner direction's overall size is lost (``polar`` is invariant to a positive factor), so bias
      corrections and ``ε`` matter only through the directions they shape.
    - ``exponent`` is the inner applier's (the spectrum's power ``p`` of :class:`precond.Power`).
    """

    inner: Applier = attrs.field(validator=slot(Applier))
    newton_schulz: NewtonSchulz = attrs.field(factory=lambda: NewtonSchulz(scale="original"),
                                              validator=attrs.validators.instance_of(NewtonSchulz))

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        inner = self.inner.apply(direction, ctx)
        if ctx.layout.order != 2:
            return inner
        return self.newton_schulz.apply(inner, ctx)
