"""``CholeskyQR``: a matmul-only refresh ``Q ← orth(S Q)`` through shifted Cholesky-QR, batched, without Householder."""

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
from precond.validators import number, one_of, plain_number, positive

PRECISIONS: tuple[str, ...] = ("float32", "float64")
"""``CholeskyQR.precision``: the dtype of the refresh's work."""

FLOAT64_TOLERANCE = torch.finfo(torch.float32).eps / 2
"""The largest ``max |QᵀQ − I|`` a float64 refresh accepts (float32's unit round-off): a successful float64
refresh is orthogonal to about 1e-11 or better, so an entry beyond it keeps its basis rather than install one less
orthogonal than its float32 rounding."""

GRAM_SHIFT = 4.0
"""``c`` of the shifted passes' ``s = c·u·‖YᵀY‖_F``: the float32 Gram matrix of unit columns was measured off by at
most ``1.1·u·‖YᵀY‖_F`` (in 2-norm) on CPU and ``0.22·u·‖YᵀY‖_F`` on an H100, so ``4`` covers it with room; a
larger ``c`` leaves ``Y`` more ill-conditioned for Cholesky-QR2 (``κ`` after a pass grows as ``√c``)."""


def cholesky_orthonormalize(y: torch.Tensor, fast_grams: bool = False, shifted_passes: int = 2,
                            plain_passes: int = 2, tolerance: Optional[float] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` of ``Y = Q R`` (``diag(R) > 0``) by shifted Cholesky-QR: ``shifted_passes`` shifted passes, then
    ``plain_passes`` plain ones (two and two by default: the shifted passes, then Cholesky-QR2), on column-normalised
    ``Y``, in ``Y``'s dtype.

    Each pass is ``Y ← Y L⁻ᵀ`` with ``L Lᵀ`` the Cholesky factorisation of ``YᵀY`` (plus ``sI`` in a shifted pass),
    so the result is always ``Y`` times an upper triangular matrix with positive diagonal, and once orthogonal it is
    ``Y``'s unique Q factor (scaling columns does not change it). Plain Cholesky-QR squares ``κ(Y)`` and fails once
    ``κ(Y)² u ≳ 1``; near the eigenbasis ``κ(Y) ~ λ_max ε/λ_i`` (the large eigenvalues' leakage dominates the
    columns of the small ones), 1e4 to 1e10 on GPT-2-small KL factors, far beyond.

    A shifted pass (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020, "Shifted Cholesky QR for computing the QR
    factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 42(1)) factors ``YᵀY + sI`` with ``s`` above
    the rounding error of the computed Gram matrix, so the factorisation cannot fail whatever ``κ(Y)``, and the
    singular values of ``Y L⁻ᵀ`` are ``σ_i/√(σ_i² + s)``: ``κ`` drops to about ``√s/σ_min(Y)``. Their ``s = 11(mn +
    n(n+1))·u·‖Y‖₂²`` bounds the worst case of the rounding (``0.8‖Y‖₂²`` at ``n = 768``: no gain); here ``s = c·u·
    ‖YᵀY‖_F`` in both shifted passes (``‖YᵀY‖_F ≥ ‖Y‖₂²``; ``c`` = :data:`GRAM_SHIFT`, from the measured error, which
    was ``≤ 0.4·u·‖YᵀY‖_F`` also for the second pass's input). Each divided ``κ`` by 300 to 6000 in float32 tests,
    so two bring ``κ(Y)`` up to about 1e10 (less at large ``n``) within Cholesky-QR2's reach (``κ ≲ u^{-1/2}``).
    Shifted Cholesky-QR3 (one shifted pass) still kept the old basis in 90 of 220 refreshes of GPT-2-small factors
    on an H100; two shifted passes (measured with ``s = c·u·√n`` in the second) in 11, all on 3072-wide factors.
    Beyond that the first Cholesky-QR2 pass can fail at its last pivot (seen in float32 from ``κ(Y) ≈ 1e11`` at
    ``n = 1024``), and the entry keeps its basis.

    Returns ``Q`` and a ``(B,)`` mask of the batch entries where every factorisation succeeded and ``Q`` is
    orthogonal to 1e-3 (NaN and ∞ fail); elsewhere it must not be used. No intermediate orthogonality is needed: each
    triangular solve is backward stable row by row and each ``L`` has norm about ``‖Y‖₂`` or at most about 1, so
    ``Y − QR`` stays ``O(n u ‖Y‖)``, and an orthogonal ``Q`` is the Q factor of a matrix that close to ``Y``, as
    Householder QR's is: its leading columns as accurate, those of singular values below ``n u ‖Y‖`` as arbitrary.

    ``fast_grams`` (the caller's ``tf32=True``, on CUDA) lets the last Gram matrix, which only checks the result,
    use TF32: TF32's rounding of unit columns moves ``YᵀY`` by ≲ 2·2⁻¹¹, so the check then accepts up to 1e-2 (a
    failed factorisation is off by O(1)). The others stay float32. A TF32 Gram matrix is still the exact Gram matrix
    of the rounded ``Ỹ`` (both operands round alike), so a shifted factorisation would not fail and ``L`` would stay
    triangular, but ``L`` would follow ``Ỹ``, whose small singular directions differ from ``Y``'s by about the TF32
    rounding ``2⁻¹¹‖Y‖``, above ``√s``: with one shifted pass, TF32 in its Gram matrix or the next kept the old basis
    in 42 % / 74 % more refreshes of GPT-2-small factors (H100). The first Cholesky-QR2 pass's input can still have
    ``κ`` near 10³, where TF32's error ``2⁻¹⁰κ²`` is O(1).

    In float64 (``u = 2⁻⁵³``) one shifted pass brings ``κ`` from up to about 1e15 to ``√(4u)·κ ≲ 1e8``, within
    Cholesky-QR2's reach there (``κ ≲ u^{-1/2} ≈ 1e8``), so :class:`CholeskyQR` with ``precision="float64"`` uses
    ``shifted_passes=1``: three passes. A single plain pass (``plain_passes=1``) leaves ``‖QᵀQ − I‖ ≈ κ_in² u``,
    where ``κ_in ≈ √(4u)·κ(Y)`` is what the shifted pass left: measured 7e-12 at ``κ(Y) = 2.4e10`` (``d = 1024``),
    far below float32's rounding of the result, so two passes serve a float32 basis up to about ``κ(Y) ≈ 1e12``.
    ``tolerance`` is the largest ``max |QᵀQ − I|`` accepted (default ``1e-3``, ``1e-2`` with ``fast_grams``).
    """
    y = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True)  # unit columns; a zero column gives NaN: not ok
    z = y.mT  # Z = Yᵀ: each pass is Z ← L⁻¹Z with a lower Cholesky factor (faster than the upper one on CUDA)
    eye = torch.eye(z.shape[-2], dtype=z.dtype, device=z.device)
    unit = torch.finfo(z.dtype).eps / 2
    ok: Optional[torch.Tensor] = None
    for index in range(shifted_passes + plain_passes):
        with tf32_matmuls(False):
            gram = z @ (y if index == 0 else z.mT)  # YᵀY
        if index < shifted_passes:  # + sI, s = c·u·‖YᵀY‖_F
            gram = torch.addcmul(gram, torch.linalg.vector_norm(gram, dim=(-2, -1), keepdim=True), eye,
                                 value=GRAM_SHIFT * unit)
        chol, info = torch.linalg.cholesky_ex(gram)  # YᵀY (+ sI) = L Lᵀ
        factored = info == 0
        ok = factored if ok is None else ok & factored
        if index >= shifted_passes:  # a failed plain factorisation: L = I keeps this entry finite (it is not used)
            chol = torch.where(factored.view(-1, 1, 1), chol, eye)
        z = torch.linalg.solve_triangular(chol, z, upper=False)  # (Y L⁻ᵀ)ᵀ
    with tf32_matmuls(fast_grams):
        gram = z @ z.mT
    # max |QᵀQ − I|; NaN and ∞ compare False, so this also requires a finite result
    ok &= max_abs(gram - eye, (-2, -1)) < (tolerance if tolerance is not None else 1e-2 if fast_grams else 1e-3)
    return z.mT, ok


@attrs.frozen
class CholeskyQR:
    """``Q_k ← orth((S_k + δI) Q_k)`` every ``every`` = T steps from matrix products and ``d × d`` Cholesky
    factorisations, batched over stacked factors and without a host synchronisation: the same ``Q`` as
    :class:`QRPowerStep` (both give the unique ``Q`` with ``diag(R) > 0``), by shifted Cholesky-QR
    (:func:`cholesky_orthonormalize`: two passes on ``YᵀY + sI``, ``s = 4·u·‖YᵀY‖_F``, then Cholesky-QR2; Fukaya et
    al., SIAM J. Sci. Comput. 2020) on the column-normalised ``Y = (S_k + δI) Q_k``.

    - Near the eigenbasis ``Y`` is ill-conditioned (``κ ~ λ_max ε/λ_i``: the large eigenvalues' leakage dominates the
      small ones' columns), 1e4 to 1e10 on GPT-2-small KL factors. Plain Cholesky-QR2 handles ``κ ≲ u^{-1/2}`` and
      kept the old basis in all 220 refreshes of those factors; the shifted passes bring ``κ`` within its reach, and
      the refresh then gives Householder QR's basis to float32 round-off (11 of 220 still kept the old basis, all on
      3072-wide factors: two shifted passes do not always suffice beyond ``κ ≈ 1e10``).
    - Cost: four Cholesky passes instead of two, so about twice the old refresh's time (estimated from its parts on
      an H100: about Householder QR's at batch 1, less when stacked at small ``d``).
    - ``shift`` δ = ``shift · tr(S_k)/d_k`` keeps columns of a rank-deficient ``S_k`` from vanishing (``δI`` does
      not change eigenvectors).
    - ``warmup``: the first refreshes use Householder QR, while the basis is still far from ``S_k``'s eigenbasis.
    - A batch entry where a factorisation fails or the result is not orthogonal to 1e-3 (non-finite input, or ``Y``
      beyond the shifted passes' reach) keeps its previous basis this time; the count is in
      ``optimizer.stats()['cholesky_qr_kept_old_basis']`` (read without synchronising the step).
    - With the optimizer's ``tf32=True`` on CUDA only the last Gram matrix, which checks orthogonality, uses TF32;
      ``S_k Q_k`` and every Gram matrix that is factored stay float32 (:func:`cholesky_orthonormalize` says why).
    - ``precision="float64"`` forms ``(S_k + δI) Q_k`` and runs the passes in float64 (one shifted pass, then
      Cholesky-QR2: three passes), and rounds the new basis to the basis dtype: every ``κ(Y)`` up to about 1e15 is
      in reach, so no refresh keeps the old basis for conditioning, and ``Q`` is Householder QR's of the exact
      product to ``d·u₆₄·κ`` plus the final rounding. Its products, Cholesky factorisations and triangular solves
      are what a GPU with float64 tensor cores (H100, H200, A100) runs at full rate; on cards whose float64 runs
      at 1/32–1/64 of float32 it is slow. Workbench name: ``basis=cholesky_qr64``. ``plain_passes=1`` (float64
      only) drops the second plain pass, which a float32 basis does not need below ``κ(Y) ≈ 1e12``
      (:func:`cholesky_orthonormalize`): two passes instead of three, not timed yet.
    """

    every: int = every_field
    warmup: int = attrs.field(
        default=2, converter=plain_number,
        validator=number(low=0, integer=True, meaning="exact QR steps before the Cholesky-QR refreshes")
    )
    shift: float = attrs.field(default=1e-5, converter=plain_number, validator=positive)
    precision: str = attrs.field(default="float32", validator=one_of(
        PRECISIONS, meaning="the dtype of the refresh's products and factorisations"))
    plain_passes: int = attrs.field(default=2, validator=one_of(
        (1, 2), meaning="plain Cholesky-QR passes after the shifted ones"))
    needs_factors = True

    def __attrs_post_init__(self) -> None:
        if self.plain_passes == 1 and self.precision != "float64":
            raise ValueError("plain_passes=1 needs precision='float64': one plain pass leaves ‖QᵀQ − I‖ ≈ κ²u, "
                             "which float32's u does not make small; use precision='float64' or plain_passes=2")

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return descending_eigh(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        if index < self.warmup:
            return Refresh(basis=power_step(factor, basis))
        float64_refresh = self.precision == "float64"
        work_dtype = torch.float64 if float64_refresh or factor.dtype == torch.float64 else torch.float32
        s, q = in_dtype(factor, work_dtype), in_dtype(basis, work_dtype)
        trace = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
        fast_grams = torch.backends.cuda.matmul.allow_tf32  # the optimizer's tf32 setting, outside the refresh
        with full_precision():
            product = torch.addcmul(s @ q, trace, q, value=self.shift / s.shape[-1])  # (S + δI) Q
            new, ok = cholesky_orthonormalize(product, fast_grams=fast_grams and product.is_cuda,
                                              shifted_passes=1 if float64_refresh else 2,
                                              plain_passes=self.plain_passes,
                                              tolerance=FLOAT64_TOLERANCE if float64_refresh else None)
        if counter is not None:
            counter.count_on_device("cholesky_qr_kept_old_basis", ~ok)
        use = ok.view(-1, 1, 1) & nonzero_factor(factor)
        return Refresh(basis=torch.where(use, in_dtype(new, basis.dtype), basis))
