"""``Refine``: a basis refresh from matrix products alone (tensor cores): warm-started iterative refinement of the
eigendecomposition of each factor (Ogita & Aishima), with no Cholesky, triangular solve or Householder QR."""

from __future__ import annotations

from typing import Literal, Optional

import attrs
import torch

from bases._common import every_field, nonzero_factor
from bases.eigh import descending_eigh
from precond.fallbacks import FallbackCounter
from precond.precision import full_precision, in_dtype, tf32_matmuls
from precond.refresh import Refresh
from precond.validators import number, one_of, plain_number

Precision = Literal["float32", "tf32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bfloat16")
DAMPINGS: tuple[str, ...] = ("local", "paper")

MAX_DEFECT = 0.5
"""A sweep whose ``‖I − XᵀX‖_F`` before its orthonormalisation reaches this (or is not finite) is rejected: the
second-order Newton–Schulz step leaves ``(5/8)‖R‖³``, no longer small from there on."""


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to TF32's 10 stored mantissa bits (to nearest, ties away from zero), kept in float32:
    what a TF32 tensor-core product sees of an operand. Non-finite entries give non-finite results."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


def round_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 (7 stored mantissa bits, to nearest even), kept in float32."""
    return x.to(torch.bfloat16).to(torch.float32)


_BF16_OUT_FLOAT32: dict[str, bool] = {}
"""Per device type: whether ``torch.bmm(bf16, bf16, out_dtype=float32)`` runs (probed at the first use)."""


def product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """``a @ b`` with operands rounded to ``precision`` and float32 accumulation; float64 operands stay float64.

    The rounding is the same on every device, so a CPU run shows the numerics of the GPU one (up to the order of
    the sums): ``"float32"`` full float32 (no TF32); ``"tf32"`` operands rounded to TF32 (on CUDA by the tensor cores
    themselves, elsewhere emulated by :func:`round_to_tf32`); ``"bfloat16"`` operands rounded to bfloat16 (on CUDA a
    bfloat16 tensor-core product with a float32 output, or where that overload is missing the same numbers from a
    TF32 product of bfloat16-rounded operands, which TF32 holds exactly; elsewhere emulated).
    """
    if a.dtype == torch.float64 or precision == "float32":
        with full_precision():
            return a @ b
    if precision == "bfloat16":
        if a.is_cuda and a.dim() == 3 and b.dim() == 3 and _BF16_OUT_FLOAT32.get("cuda", True):
            try:
                result = torch.bmm(a.to(torch.bfloat16), b.to(torch.bfloat16), out_dtype=torch.float32)
                _BF16_OUT_FLOAT32["cuda"] = True
                return result
            except (RuntimeError, NotImplementedError, TypeError):
                _BF16_OUT_FLOAT32["cuda"] = False
        a, b = round_to_bfloat16(a), round_to_bfloat16(b)
    if a.is_cuda:
        with tf32_matmuls(True):
            return a @ b
    with full_precision():
        return round_to_tf32(a) @ round_to_tf32(b)


def gram(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``XᵀX`` to about float32 accuracy, from tensor-core products where ``precision`` allows them.

    ``"float32"`` (and float64): one full-precision product. Otherwise the split ``X = H + L`` with ``H`` =
    :func:`round_to_tf32` ``(X)``: ``XᵀX ≈ HᵀH + HᵀL + (HᵀL)ᵀ`` from two TF32 products. ``H`` is exact in TF32 and
    ``|L| ≤ 2⁻¹¹|X|``, so what TF32 rounds (``L``, by ≤ 2⁻¹⁰ of itself) and what is dropped (``LᵀL``) are
    ≲ 2⁻²⁰ of ``|X|ᵀ|X|``: the orthogonality check and the orthonormalisation read a float32-accurate Gram matrix.
    """
    if x.dtype == torch.float64 or precision == "float32":
        with full_precision():
            return x.mT @ x
    high = round_to_tf32(x)
    cross = product(high.mT, x - high, "tf32")
    return product(high.mT, high, "tf32") + (cross + cross.mT)


def rotation(s: torch.Tensor, lam: torch.Tensor, damping: str) -> torch.Tensor:
    """The antisymmetric first-order rotation ``W`` that diagonalises ``S = XᵀAX`` (``lam``: its Rayleigh quotients).

    ``W_ij = n_ij g_ij / (g_ij² + μ_ij²)`` with ``n`` = the off-diagonal of ``S`` and ``g_ij = λ̃_j − λ̃_i``.
    ``"local"``: ``μ_ij² = (ρ_i² + ρ_j²)/2``, ``ρ_i² = Σ_{k≠i} n_ik²`` (the squared residual ``‖A x_i − λ̃_i x_i‖²`` of
    column ``i``). ``"paper"``: Ogita & Aishima's switch — ``W_ij = n_ij / g_ij`` where ``|g_ij| > ω``,
    ``ω = 2‖S − diag(λ̃)‖_F`` (their ``2(‖S − D̃‖₂ + ‖A‖₂‖R‖₂)`` with Frobenius bounds, ``R ≈ 0`` since every sweep
    ends orthonormal), else 0.
    """
    n = s - torch.diag_embed(torch.diagonal(s, dim1=-2, dim2=-1))
    g = lam.unsqueeze(-2) - lam.unsqueeze(-1)
    if damping == "local":
        rho2 = (n * n).sum(-2)
        denominator = g * g + 0.5 * (rho2.unsqueeze(-1) + rho2.unsqueeze(-2))
    else:
        omega = 2 * torch.linalg.matrix_norm(s - torch.diag_embed(lam)).view(*lam.shape[:-1], 1, 1)
        denominator = torch.where(g.abs() > omega, g * g, torch.full_like(g, torch.inf))
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, n * g / safe, torch.zeros_like(g))


def refine_sweep(a: torch.Tensor, x: torch.Tensor, precision: str, damping: str = "local",
                 max_rotation: float = 1.0, sort: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One sweep ``X ← orth(X exp₄(W))``: returns the new ``X``, the ``(B,)`` defect ``ε = ‖I − XᵀX‖_F``
    before the orthonormalisation (the result's is ``≲ (5/8)ε³`` plus round-off; NaN where ``S = XᵀAX`` is not
    finite; a sweep is valid where ``ε <`` :data:`MAX_DEFECT` and ``X`` is finite, :func:`valid`), and (``sort``)
    the permutation that ordered the columns of ``X`` by descending Rayleigh quotient first.

    ``exp₄(W) = I + W + W²/2 + W³/6 + W⁴/24`` (``W`` first scaled to ``‖W‖₂ ≤ max_rotation``, bounded by
    ``‖W²‖_F^½``) is orthogonal to ``‖W‖₂⁶/72`` (``exp₄(−W) exp₄(W) = I + W⁶/72 + …``: the odd powers cancel); the
    second-order Newton–Schulz step ``X ← X (I + R/2 + 3R²/8)``, ``R = I − XᵀX``, the Taylor
    polynomial of ``(XᵀX)^(-1/2)``, then leaves ``‖I − XᵀX‖ ≲ (5/8)‖R‖³`` plus round-off.
    """
    ax = product(a, x, precision)
    s = product(x.mT, ax, precision)
    s = 0.5 * (s + s.mT)
    permutation = None
    if sort:
        permutation = torch.argsort(torch.diagonal(s, dim1=-2, dim2=-1), dim=-1, descending=True)
        x = torch.gather(x, -1, permutation.unsqueeze(-2).expand_as(x))
        s = torch.gather(s, -1, permutation.unsqueeze(-2).expand_as(s))
        s = torch.gather(s, -2, permutation.unsqueeze(-1).expand_as(s))
    norms2 = (x * x).sum(-2).clamp_min(torch.finfo(x.dtype).tiny)
    lam = torch.diagonal(s, dim1=-2, dim2=-1) / norms2  # s_ii / (1 − r_ii): the Rayleigh quotients
    w = rotation(s, lam, damping)
    w2 = product(w, w, precision)
    bound = torch.linalg.matrix_norm(w2).sqrt().view(*w.shape[:-2], 1, 1)
    scale = (max_rotation / bound.clamp_min(torch.finfo(x.dtype).tiny)).clamp(max=1.0)
    w, w2 = scale * w, (scale * scale) * w2
    x = x + product(x, w + 0.5 * w2 + product(w2, w / 6 + w2 / 24, precision), precision)  # X (exp₄(W) − I)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    r = eye - gram(x, precision)
    finite = torch.isfinite(s).all(-1).all(-1)  # a non-finite factor, whose NaN the rotation would not show
    defect = torch.where(finite, torch.linalg.matrix_norm(r), torch.nan)
    # the corrections that set orthogonality are small: TF32 rounds them to ≲ 2⁻¹¹ of a small number (bfloat16 to
    # 2⁻⁸ of it would be ~1e-5 of X), so they take TF32 whatever ``precision`` says
    fine = "float32" if precision == "float32" else "tf32"
    x = x + product(x, 0.5 * r + 0.375 * product(r, r, fine), fine)
    return x, defect, permutation


def valid(x: torch.Tensor, defect: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the sweep that gave ``x`` with ``defect`` may be used (NaN compares False, so it fails too)."""
    return (defect < MAX_DEFECT) & torch.isfinite(x).all(-1).all(-1)


@attrs.frozen
class Refine:
    """``Q_k ← refine(S_k, Q_k)`` every ``every`` = T steps: ``sweeps`` sweeps of warm-started iterative refinement
    of the eigendecomposition (Ogita & Aishima, "Iterative refinement for symmetric eigenvalue decomposition", Japan
    J. Indust. Appl. Math. 2018; written from the paper's formulas), each of nine matrix products of the factor's size
    that run on tensor cores in ``precision`` (``"tf32"``, the default, or ``"bfloat16"``: operands rounded, float32
    accumulation); no Cholesky, triangular solve or Householder QR. The first basis comes from ``eigh``.

    **Why not orthogonalise ``S_k Q_k`` by a polar (Newton–Schulz) iteration**, the tensor-core kernel Muon uses: it
    never moves the basis. With ``S`` SPD and ``Q`` orthogonal, ``S Q = Q (QᵀSQ)`` and ``QᵀSQ`` is SPD, so that *is*
    the polar decomposition of ``S Q``: ``polar(S Q) = Q`` for every orthogonal ``Q``, eigenbasis or not. A subspace
    step needs the triangular (QR) factor, which is what costs float32 Cholesky/``trsm``/Householder time.

    **A sweep** (:func:`refine_sweep`), from ``X`` = the current basis (orthonormal) and ``A = S_k``:

    1. ``S = Xᵀ(A X)`` (two products), ``λ̃_i = s_ii / ‖x_i‖²`` (the paper's ``s_ii / (1 − r_ii)``);
    2. the rotation ``W_ij = n_ij g_ij / (g_ij² + μ_ij²)`` with ``n`` the off-diagonal of ``S``, ``g_ij = λ̃_j − λ̃_i``
       and ``μ_ij² = (ρ_i² + ρ_j²)/2``, the mean of the two columns' squared residuals ``ρ_i² = Σ_{k≠i} n_ik²``
       (``= ‖A x_i − λ̃_i x_i‖²``): the paper's
       ``E_ij = (s_ij + λ̃_j r_ij)/(λ̃_j − λ̃_i)`` (its antisymmetric, rotating part; its symmetric part ``R/2`` is
       step 4) where the gap dominates the residuals — Newton's step, quadratic convergence — and a step shrinking
       like ``n_ij g_ij / μ²`` (a gradient step of the double-bracket flow) for pairs the residuals cannot yet tell
       apart: a cluster, or columns still mixed. Each column of ``W`` has norm ≤ 1/√2 (``|W_ij| ≤ |n_ij| / (2μ_ij)
       ≤ |n_ij| / (√2 ρ_i)``, squared and summed over ``j``), and ``W`` is scaled to ``‖W‖₂ ≤ max_rotation``
       (bounded through ``‖W²‖_F^½``). The weight ½ of ``μ²`` was chosen over 1, ¼ and 0.1 on the drifting and the
       captured factors of the tests (1 and ¼ within 20 % of it, 0.1 worse: too little damping of the tail);
    3. ``X ← X exp₄(W) = X + X (W + W²/2 + W²(W/6 + W²/24))`` (three products), the exponential to fourth order,
       orthogonal to ``‖W‖⁶/72`` (≤ 1/72);
    4. ``X ← X + X (R/2 + 3R²/8)``, ``R = I − XᵀX`` (three products): the paper's ``R/2`` with the next Taylor term,
       leaving ``(5/8)‖R‖³``.

    **The paper's separation rule, measured** (``damping="paper"``, for comparison): ``W_ij = n_ij / g_ij`` only where
    ``|g_ij| > ω = 2(‖S − D̃‖ + ‖A‖‖R‖)``, with one ``ω`` for all pairs. It converges quadratically from a close
    start (``tests/test_refine.py``), but a warm start ``T`` steps old is not close: ``‖S − D̃‖`` is then set by the
    largest eigenvalues' couplings, ``ω`` exceeds nearly every gap of a power-law spectrum, and the basis freezes
    (on the drifting factors of the tests it ends where a never-refreshed basis ends). The local damping ``μ_ij``,
    continuous in the inputs, replaces it. The 2019 sequel's treatment of clusters (a small ``eigh`` of each
    cluster's block) is not done: cluster sizes are data dependent (no batching, no graph capture), and a rotation
    inside a cluster changes ``QᵀSQ`` by no more than the cluster's width. (Part II, "clustered eigenvalues", JJIAM
    2019.)

    **Precision.** Float64 factors run in float64 throughout. Otherwise (work in float32) the two products of ``S``
    and the three of the rotation (``W²``, ``W²(…)``, ``X·(exp₄(W) − I)``) take ``precision`` operands: errors of
    ``u = 2⁻¹¹`` (TF32) or ``2⁻⁸`` (bfloat16) relative to ``|S|`` enter ``n`` as noise, which the residuals ``ρ``
    contain, so noise-level pairs are damped rather than rotated; an eigenbasis is held to off-diagonal energy
    ``≤ 2u`` (measured 0.8u; full float32: 2⁻²²), far below what a refresh ``T`` steps late leaves (1e-2 to 1e-1 in
    the tests). What sets orthogonality stays float32-accurate: the rounding of ``X·(exp₄(W) − I)`` (≤ u of it) is
    part of the defect ``R`` that step 4 removes, whose Gram matrix ``XᵀX`` comes from a TF32 split (:func:`gram`,
    float32-accurate) and whose correction ``X·(R/2 + 3R²/8)`` is small, so TF32 rounds it to ``u‖R‖`` (both in
    TF32 with ``"bfloat16"`` too). Orthogonality ends at float32's level (2e-6 to 5e-6 for d = 64 to 256, below
    Householder QR's). ``precision="float32"`` runs everything in full float32 (no tensor cores; on the CPU, where
    ``"tf32"`` is emulated by rounding, also the fastest).

    - ``sweeps``: sweeps per refresh (each 9 products; 8 in float32 or float64, whose Gram is one product).
      On drifting factors (``tests/test_refine.py``, d = 32 to 256) two sweeps leave 1.1–8× less off-diagonal energy
      than one QR power step per refresh, at every drift tried (on KL factors captured from a GPT run, 2.5–5× in
      the median); one sweep does better where the drift is the EMA's noise, about ties on slow drift and loses on
      fast drift.
    - ``sort``: first order the columns by descending Rayleigh quotient (from the first sweep's ``S``, no extra
      product), as :class:`QRPowerStep`'s ``sort``; the permutation is returned so per-column state moves with
      its column. Without it columns keep their place (the refinement tracks each column's eigenvector).
    - A batch entry whose sweep is not valid (a non-finite result, or ``‖I − XᵀX‖_F ≥`` :data:`MAX_DEFECT` before the
      orthonormalisation) keeps its previous basis; the count is in ``optimizer.stats()['refine_kept_old_basis']``
      (read without synchronising the step). An all-zero factor keeps its basis.
    """

    every: int = every_field
    sweeps: int = attrs.field(default=2, converter=plain_number,
                              validator=number(low=1, integer=True, meaning="refinement sweeps per refresh"))
    sort: bool = False
    precision: Precision = attrs.field(
        default="tf32", validator=one_of(PRECISIONS, meaning="operand precision of the large products"))
    damping: Literal["local", "paper"] = attrs.field(
        default="local", validator=one_of(DAMPINGS, meaning="which pairs the refinement rotates"))
    max_rotation: float = attrs.field(
        default=1.0, converter=plain_number,
        validator=number(low=0, low_open=True, high=1, meaning="the largest rotation ‖W‖₂ of one sweep"))
    needs_factors = True
    capturable = True
    """Its refresh is products and elementwise work only: ``capture=True`` records it as a CUDA graph
    (``precond.captured_refresh``)."""

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return descending_eigh(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        work_dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
        a, x = in_dtype(factor, work_dtype), in_dtype(basis, work_dtype)
        ok: Optional[torch.Tensor] = None
        permutation = None
        for sweep in range(self.sweeps):
            x, defect, moved = refine_sweep(a, x, self.precision, self.damping, self.max_rotation,
                                            sort=self.sort and sweep == 0)
            permutation = moved if moved is not None else permutation
            ok = valid(x, defect) if ok is None else ok & valid(x, defect)
        assert ok is not None
        if permutation is not None:
            basis = torch.gather(basis, -1, permutation.unsqueeze(-2).expand_as(basis))
        if counter is not None:
            counter.count_on_device("refine_kept_old_basis", ~ok)
        use = ok.view(-1, 1, 1) & nonzero_factor(factor)
        return Refresh(basis=torch.where(use, in_dtype(x, basis.dtype), basis), permutation=permutation)
