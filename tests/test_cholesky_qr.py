"""``bases.CholeskyQR`` near the eigenbasis, where ``(S + δI) Q`` is ill-conditioned: shifted Cholesky-QR gives
Householder QR's basis (``diag(R) > 0``), orthogonal to float32 round-off, instead of keeping the old basis.

References are float64: Householder QR (``torch.linalg.qr``, signs fixed so ``diag(R) > 0``) of the float64
``Y = (S + δI) Q`` formed in float32 from the same ``S`` and ``Q`` (the refresh's input), and ``QᵀSQ`` in float64.

Tolerances (``u`` = float32 unit round-off ``2⁻²⁴``, ``d`` the size, ``C = 4`` for the rounding of the float32
result itself at small ``d``):

- orthogonality: ``max |QᵀQ − I| ≤ C·d·u``, what a backward-stable orthonormalisation in float32 reaches (float32
  Householder QR and the refresh both gave at most ``0.2·d·u`` on these cases);
- columns: column ``j`` of ``Y``'s Q factor depends only on ``Y``'s first ``j`` columns, so to first order a
  perturbation ``‖ΔY‖ ≤ ε‖Y‖`` of the column-normalised ``Y`` moves it by at most about ``κ(Y[:, :j])·ε``. A
  backward-stable QR in float32 has ``ε ≈ d·u``, so the test allows ``|Q[:, j] − Q_ref[:, j]| ≤ C·d·u·κ(Y[:, :j])``
  for every ``j`` (float32 Householder QR stayed within ``0.2·d·u·κ`` here). The leading columns, those of the
  large eigenvalues, have ``κ ≈ 1`` and must agree to ``C·d·u``; the bound says nothing about the trailing ones
  once ``d·u·κ ≳ 1``, where no float32 QR determines them either.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases
from precond.fallbacks import FallbackCounter
from precond.precision import tf32_matmuls

from reference import F64
from strategies import seeds

U32 = torch.finfo(torch.float32).eps / 2
SHIFT = bases.CholeskyQR.__attrs_attrs__.shift.default  # δ = shift · tr(S)/d, as the refresh adds it


def _tol(d: int) -> float:
    """``C·d·u`` with ``C = 4``: room for the rounding of the float32 result itself at small ``d``."""
    return 4 * d * U32


def _factor_and_start(d: int, gen: torch.Generator, lowest: float, zeros: int, noise: float,
                      dtype: torch.dtype = torch.float32):
    """``S = U diag(λ) Uᵀ`` (λ log-spaced from 1 to ``10**lowest``, the last ``zeros`` of them exactly 0) and a start
    ``U exp(A − Aᵀ)`` near its eigenbasis (``A`` with N(0, noise²) entries), both made in float64 and returned in
    ``dtype``."""
    u, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    u = u * torch.sign(torch.diagonal(r))
    values = torch.logspace(0, lowest, d, dtype=F64)
    if zeros:
        values[d - zeros:] = 0
    a = noise * torch.randn(d, d, generator=gen, dtype=F64)
    return (u @ torch.diag(values) @ u.T).to(dtype), (u @ torch.linalg.matrix_exp(a - a.T)).to(dtype)


def _stack(d: int, gen: torch.Generator, specs) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_factor_and_start(d, gen, *spec) for spec in specs]
    return torch.stack([s for s, _ in pairs]), torch.stack([q for _, q in pairs])


def _product(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Y = (S + δI) Q`` in float32, as the refresh forms it (to one rounding of the small ``δQ`` term, which moves
    each column by at most ``u`` of its norm: ``‖δ q_j‖ ≤ ‖(S + δI) q_j‖`` for ``S ⪰ 0``)."""
    s, q = s.float(), q.float()
    return s @ q + (SHIFT * torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1) / s.shape[-1]) * q


def _q_factor(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 Householder Q (``diag(R) > 0``) of the column-normalised ``y`` (float64), and ``κ(Y[:, :j])`` for
    ``j = 1 … d`` (``(B, d)``)."""
    y = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    want, r = torch.linalg.qr(y)
    want = want * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    leading = torch.stack([torch.linalg.cond(y[..., : j + 1]) for j in range(y.shape[-1])], dim=-1)
    return want, leading


def _householder_reference(s: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_q_factor` of the float32 ``Y = (S + δI) Q``."""
    return _q_factor(_product(s, q).double())


def _orthogonality(q: torch.Tensor) -> torch.Tensor:
    q = q.double()
    return (q.mT @ q - torch.eye(q.shape[-1], dtype=F64)).abs().amax((-2, -1))


def _off_diagonal_energy(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``‖offdiag(QᵀSQ)‖_F / ‖diag(QᵀSQ)‖₂`` in float64, per batch entry."""
    m = q.double().mT @ s.double() @ q.double()
    diagonal = torch.diagonal(m, dim1=-2, dim2=-1)
    return (m - torch.diag_embed(diagonal)).square().sum((-2, -1)).sqrt() / torch.linalg.vector_norm(diagonal, dim=-1)


def _refresh(s: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    counter = FallbackCounter()
    new = bases.CholeskyQR(warmup=0).refresh(s, q, counter, index=5).basis
    return new, counter.as_dict().get("cholesky_qr_kept_old_basis", 0)


def test_an_ill_conditioned_refresh_gives_householder_qrs_basis():
    """KL-factor-like spectrum (λ from 1 down to 1e-8, d = 128) and a start 1e-2 off the eigenbasis: the
    column-normalised ``Y`` has ``κ ≈ 7e5``, beyond float32 Cholesky-QR2 (``κ² u ≫ 1``), which kept the old basis of
    every entry here. Shifted Cholesky-QR refreshes all of them: orthogonal, Householder QR's columns to the bound
    of the module docstring (the leading ones to ``C·d·u``), and the off-diagonal energy of ``QᵀSQ`` reduced as by
    Householder QR's power step."""
    d = 128
    gen = torch.Generator().manual_seed(0)
    s, q = _stack(d, gen, [(-8.0, 0, 1e-2)] * 3)
    new, kept = _refresh(s, q)
    assert kept == 0
    assert not torch.equal(new, q)
    assert (_orthogonality(new) <= _tol(d)).all()
    want, leading = _householder_reference(s, q)
    assert leading.amax() > 1e5  # the ill-conditioned case this test is about
    error = (new.double() - want).abs().amax(dim=-2)  # per column
    assert (error <= _tol(d) * leading).all()
    assert (error[:, : d // 4] <= _tol(d)).all()  # the large eigenvalues' columns: κ(Y[:, :j]) ≈ 1 there
    before, after = _off_diagonal_energy(s, q), _off_diagonal_energy(s, new)
    householder = _off_diagonal_energy(s, bases.QRPowerStep(every=1).refresh(s, q).basis)
    assert (after < 0.2 * before).all()
    torch.testing.assert_close(after, householder, rtol=1e-3, atol=0)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 48), seed=seeds,
       specs=st.lists(st.tuples(st.floats(-10, 0), st.integers(0, 47), st.sampled_from([0.0, 1e-5, 1e-3, 1e-2, 1e-1])),
                      min_size=1, max_size=3))
def test_the_refresh_is_householder_qrs_basis_wherever_that_is_well_determined(d, seed, specs):
    """Random batches of spectra (some with exact zeros: δI keeps ``Y`` full rank) and near-eigenbasis starts: never
    NaN, always orthogonal (a kept old basis is too), and every entry with ``κ(Y) ≤ 1e4`` is refreshed to
    Householder QR's basis within the per-column bound."""
    gen = torch.Generator().manual_seed(seed)
    specs = [(lowest, min(zeros, d - 1), noise) for lowest, zeros, noise in specs]
    s, q = _stack(d, gen, specs)
    new, kept = _refresh(s, q)
    assert torch.isfinite(new).all()
    assert (_orthogonality(new) <= _tol(d)).all()
    want, leading = _householder_reference(s, q)
    determined = leading[:, -1] <= 1e4
    assert kept <= int((~determined).sum())
    error = (new.double() - want).abs().amax(dim=-2)
    assert (error[determined] <= _tol(d) * leading[determined]).all()


def _cholesky_qr2(y: torch.Tensor) -> torch.Tensor:
    """The refresh before the shifted passes: two plain Cholesky-QR passes on the column-normalised ``Y``."""
    y = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    for _ in range(2):
        y = torch.linalg.solve_triangular(torch.linalg.cholesky(y.mT @ y), y.mT, upper=False).mT
    return y


def test_a_well_conditioned_refresh_is_unchanged_by_the_shifted_passes():
    """Where Cholesky-QR2 alone succeeded (spectrum 1 … 1e-2, start 1e-3 off the eigenbasis), the extra shifted passes
    give its basis to float32 round-off: both are ``Y``'s Q factor, ``κ(Y)`` is small."""
    d = 40
    gen = torch.Generator().manual_seed(1)
    s, q = _stack(d, gen, [(-2.0, 0, 1e-3), (-1.0, 0, 1e-2)])
    new, kept = _refresh(s, q)
    assert kept == 0
    old = _cholesky_qr2(_product(s, q))
    _, leading = _householder_reference(s, q)
    assert leading.amax() < 100
    torch.testing.assert_close(new, old, rtol=0, atol=2 * _tol(d) * float(leading.amax()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factors_are_refreshed_in_float32(dtype):
    """A bfloat16/float16 factor (or basis) is refreshed in float32 and returned in the basis dtype, as before the
    shifted passes: the same basis as the float32 refresh of the same values."""
    d = 32
    gen = torch.Generator().manual_seed(2)
    s, q = _stack(d, gen, [(-2.0, 0, 1e-3), (-1.0, 0, 1e-2)])
    s = s.to(dtype)
    new, kept = _refresh(s, q)
    assert new.dtype == torch.float32 and kept == 0
    assert torch.equal(new, _refresh(s.float(), q)[0])
    half, kept = _refresh(s, q.to(dtype))
    assert half.dtype == dtype and kept == 0
    assert torch.equal(half, _refresh(s.float(), q.to(dtype).float())[0].to(dtype))


@pytest.mark.gpu
def test_the_ill_conditioned_refresh_with_tf32_grams_on_cuda():
    """``tf32=True`` (TF32 in the Gram matrices that ``cholesky_orthonormalize`` allows) refreshes the ill-conditioned
    case too, to the same basis as full float32 within the per-column bound."""
    d = 256
    gen = torch.Generator().manual_seed(3)
    s, q = _stack(d, gen, [(-8.0, 0, 1e-2), (-6.0, 8, 1e-3)])
    want, leading = _householder_reference(s, q)
    s, q = s.cuda(), q.cuda()
    for tf32 in (False, True):
        with tf32_matmuls(tf32):
            new, kept = _refresh(s, q)
        assert kept == 0
        new = new.cpu()
        assert (_orthogonality(new) <= _tol(d)).all()
        assert ((new.double() - want).abs().amax(dim=-2) <= _tol(d) * leading).all()


# --- precision="float64" ----------------------------------------------------------------------------------------
U64 = torch.finfo(torch.float64).eps / 2


def _refresh64(s: torch.Tensor, q: torch.Tensor, shift: float = SHIFT, plain_passes: int = 2
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 refresh of each batch entry alone, and which entries kept their old basis (each its own count);
    the batched refresh gives the same bases where none is kept."""
    refresher = bases.CholeskyQR(warmup=0, precision="float64", shift=shift, plain_passes=plain_passes)
    bases_, kept = [], []
    for i in range(s.shape[0]):
        counter = FallbackCounter()
        bases_.append(refresher.refresh(s[i:i + 1], q[i:i + 1], counter, index=5).basis)
        kept.append(counter.as_dict().get("cholesky_qr_kept_old_basis", 0) == 1)
    new, kept_ = torch.cat(bases_), torch.tensor(kept, device=s.device)
    if not kept_.any():
        counter = FallbackCounter()
        torch.testing.assert_close(refresher.refresh(s, q, counter, index=5).basis, new, rtol=0, atol=4 * U32)
        assert counter.as_dict().get("cholesky_qr_kept_old_basis", 0) == 0
    return new, kept_


def _exact_reference(s: torch.Tensor, q: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_q_factor` of ``Y = (S + δI) Q`` formed in float64 from the float32 ``S`` and ``Q``
    (``δ = shift·tr(S)/d``)."""
    s, q = s.double(), q.double()
    return _q_factor(s @ q + (shift * torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1) / s.shape[-1]) * q)


def _bound64(d: int, leading: torch.Tensor) -> torch.Tensor:
    """Per column: ``C·d·u₆₄·κ(Y[:, :j])`` (a backward-stable float64 QR of the float64 ``Y``), plus ``2u₃₂`` for
    the rounding of the result (entries of magnitude ≤ 1) to float32."""
    return 4 * d * U64 * leading + 2 * U32


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 48), seed=seeds, shift=st.sampled_from([SHIFT, 1e-12]), plain_passes=st.sampled_from([1, 2]),
       specs=st.lists(st.tuples(st.floats(-16, 0), st.integers(0, 47), st.sampled_from([0.0, 1e-5, 1e-3, 1e-2, 1e-1])),
                      min_size=1, max_size=3))
def test_the_float64_refresh_is_householder_qrs_basis_of_the_exact_product(d, seed, shift, plain_passes, specs):
    """``precision="float64"``: each entry refreshed is orthogonal to float32 round-off, and each of its columns is
    the float64 Householder Q factor's of the exactly formed ``Y`` within ``C·d·u₆₄·κ(Y[:, :j]) + 2u₃₂``: also the
    trailing columns, those of the small eigenvalues, that no float32 QR determines once ``d·u₃₂·κ ≳ 1``. With the
    two plain passes every entry is refreshed (``κ(Y)`` up to about 1e15); with one, every entry up to ``κ(Y) =
    1e10`` (the docstring's reach is about 1e12), and one beyond keeps its old basis rather than install a worse."""
    gen = torch.Generator().manual_seed(seed)
    specs = [(lowest, min(zeros, d - 1), noise) for lowest, zeros, noise in specs]
    s, q = _stack(d, gen, specs)
    new, kept = _refresh64(s, q, shift, plain_passes)
    want, leading = _exact_reference(s, q, shift)
    assert new.dtype == torch.float32
    if plain_passes == 2:
        assert not kept.any()
    else:
        assert not kept[leading[:, -1] <= 1e10].any()
    assert (_orthogonality(new) <= _tol(d)).all()
    refreshed = ~kept
    assert ((new.double() - want).abs().amax(dim=-2)[refreshed] <= _bound64(d, leading[refreshed])).all()


def test_the_float64_refresh_determines_the_columns_float32_cannot():
    """λ from 1 down to 1e-14 with a tiny shift: ``κ(Y) ≈ 4e10``. The float64 refresh gives every column of the
    exact product's Q factor within the bound; the float32 refresh (the default) is off by O(1) in the trailing
    columns there, as its docstring says any float32 QR is."""
    d, shift = 128, 1e-13
    gen = torch.Generator().manual_seed(0)
    s, q = _stack(d, gen, [(-14.0, 0, 1e-2)] * 2)
    want, leading = _exact_reference(s, q, shift)
    assert leading.amax() > 1e10
    for plain_passes in (2, 1):
        new, kept = _refresh64(s, q, shift, plain_passes)
        assert not kept.any()
        assert ((new.double() - want).abs().amax(dim=-2) <= _bound64(d, leading)).all()
    single = bases.CholeskyQR(warmup=0, shift=shift).refresh(s, q, FallbackCounter(), index=5).basis
    assert (single.double() - want).abs().amax() > 0.1


def test_one_plain_pass_beyond_its_reach_keeps_the_old_basis():
    """A float64 factor with λ from 1 to 1e-15 and a negligible shift: ``κ(Y) ≈ 2e14``, beyond what one plain pass
    after the shifted one makes orthogonal (``κ_in ≈ √(4u₆₄)·κ ≈ 3e6``, ``κ_in² u₆₄ ≈ 1e-3``). With
    ``plain_passes=1`` the entry keeps its old basis (counted) rather than install a basis less orthogonal than
    float32's rounding; with two it is refreshed to float64 Householder QR's basis."""
    d = 64
    s, q = _stack(d, torch.Generator().manual_seed(0), [(-15.0, 0, 1e-2, F64)])
    want, leading = _q_factor(s @ q)
    assert leading[:, -1].item() > 1e14
    for plain_passes, kept in ((1, 1), (2, 0)):
        counter = FallbackCounter()
        refresher = bases.CholeskyQR(warmup=0, precision="float64", shift=1e-20, plain_passes=plain_passes)
        new = refresher.refresh(s, q, counter, index=5).basis
        assert counter.as_dict().get("cholesky_qr_kept_old_basis", 0) == kept
        assert (_orthogonality(new) <= 64 * U64).all()
        if kept:
            assert torch.equal(new, q)
        else:  # the leading columns, where κ(Y[:, :j]) is small, to float64 round-off
            assert (new - want).abs()[..., : d // 4].amax() < 1e-10


def test_the_precision_and_the_passes_are_checked():
    with pytest.raises(ValueError, match="precision .* must be one of 'float32', 'float64', got 'bfloat16'"):
        bases.CholeskyQR(precision="bfloat16")
    with pytest.raises(ValueError, match="plain_passes .* must be one of 1, 2, got 3"):
        bases.CholeskyQR(precision="float64", plain_passes=3)
    with pytest.raises(ValueError, match="plain_passes=1 needs precision='float64'"):
        bases.CholeskyQR(plain_passes=1)


@pytest.mark.gpu
def test_the_float64_refresh_on_cuda():
    """The same bound on CUDA (float64 products, Cholesky factorisations and triangular solves on the device), with
    TF32 allowed around it as inside ``precond.Optimizer(tf32=True)``."""
    d, shift = 256, 1e-13
    gen = torch.Generator().manual_seed(4)
    s, q = _stack(d, gen, [(-14.0, 0, 1e-2), (-8.0, 8, 1e-3)])
    want, leading = _exact_reference(s, q, shift)
    for plain_passes in (2, 1):
        with tf32_matmuls(True):
            new, kept = _refresh64(s.cuda(), q.cuda(), shift, plain_passes)
        assert not kept.any()
        new = new.cpu()  # noqa: PLW2901
        assert (_orthogonality(new) <= _tol(d)).all()
        assert ((new.double() - want).abs().amax(dim=-2) <= _bound64(d, leading)).all()
