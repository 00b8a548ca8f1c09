"""``KL``: the KL-Shampoo estimator of Lin et al. (2025), for weights of any order.

With ``P_j = Q_j diag(λ_j)^{-1} Q_jᵀ ≈ S_j^{-1}`` (identity for modes without a factor), every step and for
every factored mode ``k`` (all reads before writes: Jacobi order, as Eq. 4):

- ``Δ_k = G_(k) (⊗_{j≠k} P_j) G_(k)ᵀ / D_{-k}``                    (Eq. 4/5; the N-mode extension of Claim 2)
- ``S_k ← ρ S_k + (1−ρ) Δ_k``                                       (Eq. 4, EMA weight ρ on the old value)
- ``λ_k ← ρ λ_k + (1−ρ) diag(Q_kᵀ Δ_k Q_k)``, in the possibly stale ``Q_k``  (Claim 3 / Eq. 6, Fig. 3 right)

Both come from one rotation ``R = G ×_j Q_j``: by the orthogonal invariance of ``Gram_k`` in the other modes,
``Q_kᵀ Δ_k Q_k = Gram_k(R ⊙ ⊗_{j≠k} λ_j^{-1/2}) / D_{-k}``, so ``λ_k`` is its diagonal and needs no extra
``d³`` work. A *diagonal* mode (``Q_k = I``, no ``S_k``) keeps only ``λ_k`` by the same rule: Claim 3 with
``Q = I``, the KL choice for a mode too large for a dense factor.

With ``track_drift`` the same diagonal also keeps ``D_k = diag(Q_kᵀ S_k Q_k)`` exact while ``Q_k`` stands: the fold
``S_k ← ρ S_k + (1−ρ) Δ_k`` rotates to ``D_k ← ρ D_k + (1−ρ) diag(Q_kᵀ Δ_k Q_k)`` (no clamp, the damping only where
``S_k`` gets it), and a refresh sets ``D_k`` to the new basis' Rayleigh quotients. The drift of the basis,
``r_k = ‖offdiag(Q_kᵀ S_k Q_k)‖_F / ‖S_k‖_F = √(1 − ‖D_k‖² / ‖S_k‖_F²)`` (``precond.drift``), then costs one
``d²`` reduction instead of a ``d³`` product, at any step.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import attrs
import torch

from estimators._common import FloorSpec, beta_field, floor_validator, permute_columns, spectrum_floor, sum_except
from estimators.base import Estimator
from precond.contractions import each, gram, mode_product, rotate, scale
from precond.ema import fold, fold_all, gradient_weights
from precond.layout import Layout
from precond.parts import Rotations
from precond.refresh import Refresh, rayleigh_quotients
from precond.state import ParamState, Tensors
from precond.validators import nonnegative, number, one_of, plain_number


@attrs.frozen
class KL(Estimator):
    """KL-Shampoo's factor and eigenvalue estimator (Eq. 4–6, Fig. 3 right, Claim 3).

    Fields (symbol, where in the paper):

    - ``beta`` — ρ, the EMA weight on the old ``S_k`` and ``λ_k`` (the paper's ``1−β₂`` in Eq. 4 and ``β₂``
      in Fig. 3's λ line; the prototype uses one ρ for both).
    - ``init_lambda`` — ``λ_k`` at step 0. ``0.1`` is the authors' prototype (it discards the first ``eigh``
      eigenvalues); ``None`` takes the eigenvalues of the first ``S_k``.
    - ``damping`` — κ of Eq. 2: ``E[ggᵀ] + κI`` projected on mode ``k`` adds ``c_k = κ ∏_{j≠k} mean(1/λ_j)``
      (old ``λ_j``) to ``diag(Q_kᵀ Δ_k Q_k)``. ``damping_into`` says where else: ``"factor_and_spectrum"``
      (default) also adds ``c_k I`` to ``Δ_k``, so ``S_k`` holds the projected damping too (κI at the fill);
      ``"spectrum"`` adds ``c_k`` to the ``λ_k`` update only and leaves ``S_k`` — and so the QR-refreshed bases —
      damping-free, as the authors' prototype (``update_eigen_value``; no damping at its fill).
    - ``floor`` — lower bound on ``λ_k``, kept in the state: ``"dimension"`` is the prototype's clamp
      ``λ_k ≥ max(10, min(d_k, 4000))^{-2}``; ``"product"`` puts that bound on ``∏_j λ_j`` (every mode of the view,
      the share of modes without a spectrum split evenly among those with one: the same as ``"dimension"`` when
      every mode has one, and the calibration a one-sided layout needs, ``estimators._common.spectrum_floor``);
      a number is an absolute floor. It also keeps zero directions
      from being dropped. ``floor_at_init`` (default True) applies it to ``λ₀`` as well; ``False`` leaves
      ``λ₀ = init_lambda`` as given until the first update clamps it (the prototype, which clamps only in
      ``update_eigen_value``; matters only for ``init_lambda`` below the floor, e.g. 1e-3).
    - ``refresh_spectrum`` — at a basis refresh ``"keep"`` continues the EMA column-wise in the new basis
      (the paper); ``"reset"`` replaces ``λ_k`` by the refresher's eigenvalues (or ``diag(Q_kᵀ S_k Q_k)``),
      which with ``Eigh(every=1)`` is the idealized KL-Shampoo of Fig. 3 left (``P_j = S_j^{-1}`` exactly).

    - ``rebalance`` — fix the scale gauge: ``(c S_a, S_b / c)`` is an equally good fixed point, and only the
      product is pinned; rebalancing after each update gives every mode the same mean eigenvalue without changing
      the preconditioner (off by default, as the prototype).

    - ``order`` — ``"jacobi"`` (default, Eq. 4): every estimate reads the old ``λ_j``. ``"prototype"``: the
      authors' ``update_3d_preconditioner`` order, a parity mode for 3-mode layouts (other orders are Jacobi
      there too): the estimates of ``S_3``, ``λ_3`` and ``S_2`` read the old spectra; then ``λ_3`` is written
      (and clamped); ``λ_2``'s estimate reads the new ``λ_3``; then ``λ_2`` is written; ``S_1`` and ``λ_1`` read
      the new ``λ_2`` and the old ``λ_3`` (1-based modes as in the prototype). The damping shift stays the one of
      the old spectra (the prototype computes its traces first).

    - ``track_drift`` — keep ``D_k = diag(Q_kᵀ S_k Q_k)`` of every factored mode (estimator tensors
      ``"drift_diagonal_k"``; module docstring) for ``precond.Optimizer(drift_tolerance=…)``, whose check then needs
      no ``d³`` product. Off by default (the state is then the prototype's); not with ``order="prototype"``.

    The initial fill (first gradient, all ``S_j = I``) gives ``S_k = (1−ρ) Gram_k(G) / D_{-k}``, as the prototype.
    """

    beta: float = beta_field
    init_lambda: Optional[float] = attrs.field(default=0.1, converter=plain_number, validator=number(
        low=0, low_open=True, optional=True, meaning="λ_k at step 0; None takes the first eigenvalues"))
    damping: float = attrs.field(default=0.0, converter=plain_number, validator=nonnegative)
    floor: FloorSpec = attrs.field(default="dimension", converter=plain_number, validator=floor_validator)
    refresh_spectrum: Literal["keep", "reset"] = attrs.field(
        default="keep", validator=one_of(("keep", "reset"))
    )
    rebalance: bool = False
    damping_into: Literal["factor_and_spectrum", "spectrum"] = attrs.field(
        default="factor_and_spectrum", validator=one_of(("factor_and_spectrum", "spectrum"))
    )
    floor_at_init: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    order: Literal["jacobi", "prototype"] = attrs.field(
        default="jacobi", validator=one_of(("jacobi", "prototype"))
    )
    track_drift: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def __attrs_post_init__(self) -> None:
        if not self.floor_at_init and self.init_lambda is None:
            raise ValueError(
                "floor_at_init=False needs a positive init_lambda (the prototype's init_factor, e.g. 0.1): "
                "with init_lambda=None the first eigenvalues may be 0 and λ₀ must be floored"
            )
        if self.track_drift and self.order == "prototype":
            raise ValueError("track_drift=True needs order='jacobi': the prototype's order folds into S_k a Δ_k whose "
                             "diagonal its λ update does not form, so D_k = diag(Q_kᵀ S_k Q_k) would need an extra "
                             "product; drop track_drift (drift_tolerance then measures the drift) or use Jacobi")

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        """``D_k`` (``(B, d_k)``, set after the first bases) for every dense mode, with ``track_drift``."""
        if not self.track_drift:
            return {}
        return {_drift_key(k): grad.new_zeros(grad.shape[0], d) for k, d in enumerate(layout.view_shape)
                if layout.kinds[k] == "dense"}

    def tracked_diagonal(self, ps: ParamState, k: int) -> Optional[torch.Tensor]:
        """``D_k = diag(Q_kᵀ S_k Q_k)`` (``(B, d_k)``) with ``track_drift``, else None."""
        return ps.estimator.get(_drift_key(k)) if self.track_drift else None

    def rotations(self, ps: ParamState, grad: torch.Tensor, layout: Layout) -> Rotations:
        """``R = G ×_j Q_j`` and the partial rotations ``G ×_{j≠k} Q_j`` of every mode with a factor, which
        :meth:`update` forms anyway (``R`` from the cheapest of them): given back to it, they are not formed twice.
        (``order="prototype"`` on a 3-mode weight folds by its own products: ``R`` alone.)"""
        if self.order == "prototype" and layout.order == 3:
            return Rotations(rotate(grad, ps.Q), {})
        bases, spectra, factors = ps.Q, ps.lam, ps.S
        with_factor = [k for k, f in enumerate(factors) if f is not None and spectra[k] is not None]
        partial = {k: rotate(grad, [q if j != k else None for j, q in enumerate(bases)]) for k in with_factor}
        if with_factor:
            cheapest = min(with_factor, key=lambda k: layout.view_shape[k])
            q = bases[cheapest]
            rotated = partial[cheapest] if q is None else mode_product(partial[cheapest], q, cheapest)
        else:
            rotated = rotate(grad, bases)
        return Rotations(rotated, partial)

    def update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, first: bool = False,
               rotations: Optional[Rotations] = None) -> None:
        """Fold one gradient ``grad`` (``(B, *view)``) into ``factors`` and ``spectra`` in place (Jacobi).

        ``Δ_k = Gram_k(Y_k) / D_{-k}`` with ``Y_k = (G ×_{j≠k} Q_j) ⊙ ⊗_{j≠k} λ_j^{-1/2}``, the gradient rotated
        and whitened on every mode but ``k`` (so no ``d_k³`` rotation back is needed), and
        ``diag(Q_kᵀ Δ_k Q_k) = Σ_{j≠k} R² ⊙ ⊗_{j≠k} λ_j^{-1} / D_{-k}`` from the full rotation
        ``R = Y_k ×_k Q_k``, which is formed once from the cheapest partial rotation (:meth:`rotations`, or the
        ``rotations`` it gave for this gradient and these bases).
        """
        active = gradient_weights(self.beta, grad)
        spectra, factors = ps.lam, ps.S
        if self.order == "prototype" and not first and layout.order == 3:
            self._prototype_3d_update(ps, grad, layout, active)
            return
        if first:  # the fill: every S_j = I
            inverse: Tensors = [None] * layout.order
            inv_sqrt: Tensors = [None] * layout.order
        else:
            broadcast = ps.broadcast_spectra()  # λ_j in the shape scale() broadcasts: no view per use
            inverse = each(torch._foreach_reciprocal, broadcast)  # one op for every mode's λ_j^{-1}
            inv_sqrt = [None if lam is None else lam.rsqrt() for lam in broadcast]
        rotated, partial = rotations if rotations is not None else self.rotations(ps, grad, layout)
        squared = rotated * rotated
        updates = {}
        drift_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (D_k, its increment), with track_drift
        for k, lam in enumerate(spectra):
            if lam is None:
                continue
            complement = layout.complement(k)
            shift = self._damping_shift(inv_sqrt, k, lam)
            diag = sum_except(scale(squared, [v if j != k else None for j, v in enumerate(inverse)]), k) / complement
            delta, undamped = None, diag
            if k in partial:
                whitened = scale(partial[k], [v if j != k else None for j, v in enumerate(inv_sqrt)])
                delta = gram(whitened, k) / complement  # G_(k) (⊗_{j≠k} P_j) G_(k)ᵀ / D_{-k}
                if shift is not None and self.damping_into == "factor_and_spectrum":
                    delta = delta + torch.diag_embed(shift.expand_as(diag))
            if shift is not None:
                diag = diag + shift
            if k in partial and not first:
                drift_pairs += self._tracked_increment(ps, k, undamped, diag)
            updates[k] = (delta, diag)
        pairs = [(factors[k], delta) for k, (delta, _) in updates.items() if delta is not None] + drift_pairs
        fold_all(pairs + [(spectra[k], diag) for k, (_, diag) in updates.items()], self.beta, active)  # after reads
        if self.rebalance and not first:
            self._rebalance(spectra, factors, [self.tracked_diagonal(ps, k) for k in range(layout.order)])
        if updates and not first:  # λ_k ≥ floor, every mode in one op
            torch._foreach_clamp_min_([spectra[k] for k in updates],
                                      [spectrum_floor(self.floor, layout, k) for k in updates])

    def _tracked_increment(self, ps: ParamState, k: int, undamped: torch.Tensor,
                           damped: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(D_k, diag(Q_kᵀ Δ_k Q_k))]`` for the ``Δ_k`` folded into ``S_k`` (with the damping shift only where
        ``S_k`` gets it), with ``track_drift``; else ``[]``."""
        tracked = self.tracked_diagonal(ps, k)
        if tracked is None:
            return []
        return [(tracked, damped if self.damping_into == "factor_and_spectrum" else undamped)]

    def _prototype_3d_update(self, ps: ParamState, grad: torch.Tensor, layout: Layout, active: torch.Tensor) -> None:
        """``order="prototype"`` on a 3-mode layout (0-based modes 0, 1, 2 here; see the class docstring)."""
        old = list(ps.lam)  # the pre-step λ_j (written below into copies, installed at the end)
        inv_sqrt = [None if lam is None else lam.rsqrt() for lam in old]
        shifts = {k: self._damping_shift(inv_sqrt, k, lam) for k, lam in enumerate(old) if lam is not None}
        new = list(old)

        def estimate(k: int, reads: Tensors) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
            return self._mode_estimate(ps, grad, layout, k, reads, shifts.get(k))

        def write(k: int, diag: Optional[torch.Tensor]) -> None:  # λ_k ← ρ λ_k + (1−ρ) diag, clamped at once
            if diag is None:
                return
            lam = old[k].clone()
            fold(lam, diag, self.beta, active)
            new[k] = lam.clamp_min_(spectrum_floor(self.floor, layout, k))

        delta_2, diag_2 = estimate(2, old)
        delta_1, _ = estimate(1, old)
        write(2, diag_2)
        write(1, estimate(1, [old[0], old[1], new[2]])[1])
        delta_0, diag_0 = estimate(0, [old[0], new[1], old[2]])
        write(0, diag_0)
        for k, delta in ((0, delta_0), (1, delta_1), (2, delta_2)):
            if delta is not None:
                fold(ps.S[k], delta, self.beta, active)
        for k, lam in enumerate(ps.lam):
            if lam is not None:
                lam.copy_(new[k])
        if self.rebalance:
            self._rebalance(ps.lam, ps.S, [None] * len(ps.S))

    def _mode_estimate(self, ps: ParamState, grad: torch.Tensor, layout: Layout, k: int, reads: Tensors,
                       shift: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(Δ_k, diag(Q_kᵀ Δ_k Q_k))`` of one mode with the spectra ``reads`` for the other modes (``None`` where
        mode ``k`` has no factor or no spectrum), damping ``shift`` included as configured."""
        if ps.lam[k] is None:
            return None, None
        complement = layout.complement(k)
        others = [None if j == k else q for j, q in enumerate(ps.Q)]
        whitened = scale(
            rotate(grad, others), [None if j == k or lam is None else lam.rsqrt() for j, lam in enumerate(reads)]
        )
        delta = gram(whitened, k) / complement if ps.S[k] is not None else None
        full = whitened if ps.Q[k] is None else mode_product(whitened, ps.Q[k], k)
        diag = sum_except(full * full, k) / complement
        if shift is not None:
            diag = diag + shift
            if delta is not None and self.damping_into == "factor_and_spectrum":
                delta = delta + torch.diag_embed(shift.expand_as(diag))
        return delta, diag

    @staticmethod
    def _rebalance(spectra: Tensors, factors: Tensors, tracked: Tensors) -> None:
        """Fix the KL scale gauge: ``(c_k S_k, c_k λ_k)`` with ``∏_k c_k = 1`` leaves ``⊗_k S_k`` — so the update
        and every ``Δ_k`` — unchanged; ``c_k`` makes every mode's mean eigenvalue the geometric mean of them all.
        A tracked ``D_k`` (``track_drift``) scales with its ``S_k``."""
        modes = [k for k, lam in enumerate(spectra) if lam is not None]
        if len(modes) < 2:
            return
        logs = torch.stack([spectra[k].mean(dim=-1).clamp_min(1e-38).log() for k in modes])  # (modes, B)
        scales = (logs.mean(dim=0, keepdim=True) - logs).exp()
        for k, c in zip(modes, scales, strict=True):
            spectra[k].mul_(c.unsqueeze(-1))
            if factors[k] is not None:
                factors[k].mul_(c.view(-1, 1, 1))
            if tracked[k] is not None:
                tracked[k].mul_(c.unsqueeze(-1))

    def _damping_shift(self, inv_sqrt: Tensors, k: int, reference: torch.Tensor) -> Optional[torch.Tensor]:
        """``κ ∏_{j≠k} mean(1/λ_j)`` as a ``(B, 1)`` tensor (``None`` without damping); modes without λ count 1."""
        if self.damping == 0.0:
            return None
        shift = torch.full_like(reference[:, :1], self.damping)
        for j, r in enumerate(inv_sqrt):
            if j != k and r is not None:  # r may come in its broadcast shape (B, 1, …, d_j, …, 1)
                shift = shift * (r * r).flatten(1).mean(dim=-1, keepdim=True)
        return shift

    def finish_init(self, ps: ParamState, refreshes: Mapping[int, Refresh], layout: Layout) -> None:
        """Set ``λ_k`` at step 0, after the first basis was computed from the filled ``S_k``."""
        for k, lam in enumerate(ps.lam):
            if lam is None:
                continue
            if self.init_lambda is not None:
                lam.fill_(self.init_lambda)
            elif k in refreshes and refreshes[k].eigenvalues is not None:
                lam.copy_(refreshes[k].eigenvalues)
            if self.floor_at_init:
                lam.clamp_min_(spectrum_floor(self.floor, layout, k))
        for k, q in enumerate(ps.Q):
            tracked = self.tracked_diagonal(ps, k)
            if tracked is not None and q is not None and ps.S[k] is not None:
                tracked.copy_(rayleigh_quotients(ps.S[k], q))

    def on_refresh(self, ps: ParamState, k: int, refresh: Refresh, layout: Layout) -> None:
        """Carry ``λ_k`` into the new basis: column-wise (permuted with the basis), or reset."""
        lam, tracked = ps.lam[k], self.tracked_diagonal(ps, k)
        spectrum = refresh.spectrum(ps.S[k]) if self.refresh_spectrum == "reset" or tracked is not None else None
        if tracked is not None:
            tracked.copy_(spectrum)  # diag(Q_newᵀ S_k Q_new): D_k restarts exact in the new basis
        if self.refresh_spectrum == "reset":
            lam.copy_(spectrum)
        elif refresh.permutation is not None:
            lam.copy_(permute_columns(lam, refresh.permutation))
        lam.clamp_min_(spectrum_floor(self.floor, layout, k))


def _drift_key(k: int) -> str:
    """The estimator tensor that holds ``D_k`` (``track_drift``)."""
    return f"drift_diagonal_{k}"
