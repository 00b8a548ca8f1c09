"""``CholeskyQR``: a matmul-only refresh ``Q ← orth(S Q)`` through Cholesky-QR2, at GEMM speed and batched."""

from __future__ import annotations

from typing import Optional

import attrs
import torch

from bases._common import every_field, nonzero_factor
from bases.eigh import descending_eigh
from bases.qr_power_step import power_step
from precond.fallbacks import FallbackCounter
from precond.precision import full_precision, in_dtype, tf32_matmuls
from precond.reductions import max_abs
from precond.refresh import Refresh
from precond.validators import number, plain_number, positive


def cholesky_orthonormalize(y: torch.Tensor, fast_grams: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` of ``Y = Q R`` (``diag(R) > 0``) by two passes of Cholesky-QR on column-normalised ``Y``.

    Scaling columns does not change the ``Q`` factor, but once ``Y ≈ Q Λ`` it makes the Gram matrix ``YᵀY ≈ I``
    well conditioned. Returns ``Q`` and a ``(B,)`` mask of the batch entries where both Cholesky factorisations
    succeeded, the first pass was already orthogonal to 0.1 (so ``Y`` was well enough conditioned for the result
    to be ``Y``'s Q factor, not just some orthogonal matrix) and the second to 1e-3; elsewhere it must not be used.

    ``fast_grams`` lets two of the three Gram matrices use TF32 on CUDA (the caller's ``tf32=True``) without changing
    ``Q`` beyond float32 round-off: the first, because pass 1 only has to make ``Y₁ = Y L₁⁻ᵀ`` well conditioned —
    ``L₁⁻ᵀ`` is upper triangular whatever its rounding, so ``Y₂ = Y L₁⁻ᵀ L₂⁻ᵀ`` is still ``Y`` times an upper
    triangular matrix, and an orthogonal ``Y U`` with ``U`` upper triangular (positive diagonal) is ``Y``'s unique
    Q factor; and the last, which only checks pass 2 (TF32's rounding of unit columns moves ``YᵀY`` by
    ≲ 2·2⁻¹¹, so that check then accepts up to 1e-2: a failed factorisation is off by O(1)). The middle Gram matrix,
    whose Cholesky factor makes ``Y₂`` orthogonal, stays float32.
    """
    y = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    ok: Optional[torch.Tensor] = None
    with tf32_matmuls(fast_grams):
        gram = y.mT @ y
    for tolerance, last in ((0.1, False), (1e-2 if fast_grams else 1e-3, True)):
        # pass 1 must be roughly orthogonal already (cond(Y) small enough), pass 2 exact
        chol, info = torch.linalg.cholesky_ex(gram)
        factored = info == 0
        ok = factored if ok is None else ok & factored
        chol = torch.where(factored.view(-1, 1, 1), chol, eye)
        y = torch.linalg.solve_triangular(chol, y.mT, upper=False).mT  # Y L^{-T}
        with tf32_matmuls(fast_grams and last):
            gram = y.mT @ y  # checks this pass, and is the next pass's Gram matrix
        # max |YᵀY − I|; NaN and ∞ compare False, so this also requires a finite error
        ok &= max_abs(gram - eye, (-2, -1)) < tolerance
    return y, ok


@attrs.frozen
class CholeskyQR:
    """``Q_k ← orth((S_k + δI) Q_k)`` every ``every`` = T steps by Cholesky-QR2: the same ``Q`` as
    :class:`QRPowerStep` (both give the unique ``Q`` with ``diag(R) > 0``) from matrix products and a
    ``d × d`` Cholesky, batched over stacked factors, instead of Householder QR.

    - ``shift`` δ = ``shift · tr(S_k)/d_k`` keeps columns of a rank-deficient ``S_k`` from vanishing (``δI`` does
      not change eigenvectors).
    - ``warmup``: the first refreshes use Householder QR, while the basis is still far from ``S_k``'s eigenbasis
      and ``S_k Q_k`` is ill-conditioned.
    - A batch entry whose Gram matrix is too ill-conditioned for Cholesky keeps its previous basis this time;
      the count is in ``optimizer.stats()['cholesky_qr_kept_old_basis']`` (read without synchronising the step).
    - With the optimizer's ``tf32=True`` on CUDA, two of the three Gram matrices use TF32 (the same ``Q`` to float32
      round-off: :func:`cholesky_orthonormalize`); ``S_k Q_k`` and the Gram matrix that orthogonalises stay float32.
    """

    every: int = every_field
    warmup: int = attrs.field(
        default=2, converter=plain_number,
        validator=number(low=0, integer=True, meaning="exact QR steps before the Cholesky-QR refreshes")
    )
    shift: float = attrs.field(default=1e-5, converter=plain_number, validator=positive)
    needs_factors = True

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return descending_eigh(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        if index < self.warmup:
            return Refresh(basis=power_step(factor, basis))
        work_dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
        s, q = in_dtype(factor, work_dtype), in_dtype(basis, work_dtype)
        d = s.shape[-1]
        trace = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1)
        fast_grams = torch.backends.cuda.matmul.allow_tf32  # the optimizer's tf32 setting, outside the refresh
        with full_precision():
            product = s @ q + (self.shift * trace / d) * q
            new, ok = cholesky_orthonormalize(product, fast_grams=fast_grams and product.is_cuda)
        if counter is not None:
            counter.count_on_device("cholesky_qr_kept_old_basis", ~ok)
        use = ok.view(-1, 1, 1) & nonzero_factor(factor)
        return Refresh(basis=torch.where(use, in_dtype(new, basis.dtype), basis))
