"""Property 4 (docs/design.md): basis refreshers.

- ``QRPowerStep`` iterated from a random orthogonal start converges to the (descending) eigenbasis of a fixed
  SPD factor and keeps ``Q`` orthogonal; one step equals the float64 ``qr(S Q)`` with ``diag(R) > 0``
  (computed independently through a Cholesky factor of ``(SQ)ᵀ(SQ)``).
- ``sort=True`` orders the old columns by descending Rayleigh quotient and reports the permutation.
- The sign convention makes an exact eigenbasis a fixed point (no flip between refreshes).
- ``Eigh`` returns descending eigenpairs; an all-zero factor keeps the previous basis.
- ``every`` must be an integer ≥ 1.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases

from reference import random_spd

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny LAPACK calls are dominated by OpenMP hand-offs on a busy 2-core box; one thread is faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- independent helpers -------------------------------------------------------------------------------------
def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def spd_with_spectrum(d: int, gen: torch.Generator, top: float = 1.0, bottom: float = 0.05):
    """``S = U diag(λ) Uᵀ`` with geometric, well-separated ``λ`` from ``top`` down to ``bottom``."""
    u = random_orthogonal(d, gen)
    if d == 1:
        lam = torch.tensor([top], dtype=F64)
    else:
        lam = top * (bottom / top) ** (torch.arange(d, dtype=F64) / (d - 1))
    s = u @ torch.diag(lam) @ u.T
    return 0.5 * (s + s.T), u, lam


def descending_eigh_reference(s: torch.Tensor):
    values, vectors = torch.linalg.eigh(s.to(F64))
    return values.flip(-1), vectors.flip(-1)


def assert_same_columns_up_to_sign(q: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """``|diag(refᵀ q)| ≈ 1`` and ``refᵀ q`` ≈ a signed identity."""
    overlap = ref.to(F64).T @ q.to(F64)
    d = overlap.shape[0]
    torch.testing.assert_close(overlap.abs(), torch.eye(d, dtype=F64), rtol=0, atol=atol)


def qr_positive_reference(a: torch.Tensor) -> torch.Tensor:
    """``Q`` of the thin QR of ``a`` with ``diag(R) > 0``, via Cholesky: ``aᵀa = RᵀR``, ``Q = a R⁻¹``."""
    a = a.to(F64)
    r = torch.linalg.cholesky(a.T @ a, upper=True)
    return torch.linalg.solve_triangular(r, a, upper=True, left=False)


# --- QRPowerStep: convergence and orthogonality --------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 12), seed=seeds)
def test_qr_power_step_converges_to_descending_eigenbasis_float64(d, seed):
    gen = torch.Generator().manual_seed(seed)
    s, _, lam = spd_with_spectrum(d, gen)
    q = random_orthogonal(d, gen).unsqueeze(0)
    refresher = bases.QRPowerStep(every=1)
    factor = s.unsqueeze(0)
    # consecutive eigenvalue ratio ≤ 0.05**(1/11) ≈ 0.76 → 300 steps shrink the error by 0.76**300 ≈ 1e-36
    for _ in range(300):
        result = refresher.refresh(factor, q)
        assert result.permutation is None
        q = result.basis
    assert q.shape == (1, d, d) and q.dtype == F64
    ref_values, ref_vectors = descending_eigh_reference(s)
    torch.testing.assert_close(ref_values, lam, rtol=1e-10, atol=1e-12)
    assert_same_columns_up_to_sign(q[0], ref_vectors, atol=1e-4)
    torch.testing.assert_close(q[0].T @ q[0], torch.eye(d, dtype=F64), rtol=0, atol=1e-10)
    # Rayleigh quotients of the converged basis are the eigenvalues, in descending order
    torch.testing.assert_close(torch.diagonal(q[0].T @ s @ q[0]), lam, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 12), seed=seeds)
def test_qr_power_step_stays_orthogonal_in_float32(d, seed):
    gen = torch.Generator().manual_seed(seed)
    s, _, lam = spd_with_spectrum(d, gen)
    q = random_orthogonal(d, gen).float().unsqueeze(0)
    factor = s.float().unsqueeze(0)
    refresher = bases.QRPowerStep(every=1)
    for _ in range(300):
        q = refresher.refresh(factor, q).basis
    assert q.dtype == torch.float32
    eye = torch.eye(d)
    torch.testing.assert_close(q[0].T @ q[0], eye, rtol=0, atol=1e-5)
    _, ref_vectors = descending_eigh_reference(s)
    assert_same_columns_up_to_sign(q[0], ref_vectors, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 8), batch=st.sampled_from([1, 2, 3]), seed=seeds, dtype=st.sampled_from([F64, torch.float32]))
def test_one_qr_power_step_equals_positive_diagonal_qr(d, batch, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    s = torch.stack([spd_with_spectrum(d, gen, top=2.0, bottom=0.1)[0] for _ in range(batch)])
    q = torch.stack([random_orthogonal(d, gen) for _ in range(batch)])
    result = bases.QRPowerStep(every=3).refresh(s.to(dtype), q.to(dtype))
    assert result.basis.shape == (batch, d, d) and result.basis.dtype == dtype
    assert result.permutation is None
    tol = 1e-10 if dtype == F64 else 1e-4
    for b in range(batch):
        expected = qr_positive_reference(s[b] @ q[b])
        torch.testing.assert_close(result.basis[b].to(F64), expected, rtol=0, atol=tol)


# --- QRPowerStep(power=p): p products of S, one QR ------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 8), batch=st.sampled_from([1, 2, 3]), power=st.integers(1, 4), seed=seeds)
def test_power_p_equals_p_single_steps_in_float64(d, batch, power, seed):
    """``qr(S^p Q)`` is ``p`` steps of orthogonal iteration: the reference takes ``p`` positive-diagonal QR steps
    one after another (through the Cholesky reference), in float64."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.stack([spd_with_spectrum(d, gen, top=2.0, bottom=0.5)[0] for _ in range(batch)])
    q = torch.stack([random_orthogonal(d, gen) for _ in range(batch)])
    result = bases.QRPowerStep(every=1, power=power).refresh(s, q)
    for b in range(batch):
        expected = q[b]
        for _ in range(power):
            expected = qr_positive_reference(s[b] @ expected)
        torch.testing.assert_close(result.basis[b], expected, rtol=0, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(2, 10), seed=seeds)
def test_refreshes_of_power_three_converge_to_the_descending_eigenbasis(d, seed):
    """λ geometric from 1 to 0.05 (consecutive ratio ≤ 0.72 for d ≤ 10): 100 refreshes of ``p = 3`` are 300 steps,
    an error shrunk by 0.72^300 ≈ 1e-43."""
    gen = torch.Generator().manual_seed(seed)
    s, _, lam = spd_with_spectrum(d, gen)
    q = random_orthogonal(d, gen).unsqueeze(0)
    refresher = bases.QRPowerStep(every=1, power=3)
    for _ in range(100):
        q = refresher.refresh(s.unsqueeze(0), q).basis
    _, vectors = descending_eigh_reference(s)
    assert_same_columns_up_to_sign(q[0], vectors, atol=1e-6)
    torch.testing.assert_close(torch.diagonal(q[0].T @ s @ q[0]), lam, rtol=0, atol=1e-9)


def test_a_power_beyond_the_precision_keeps_q_orthonormal_and_its_leading_column():
    """The documented limit: with ``(λ_d/λ_1)^p`` far below float64's ε (0.05^200 ≈ 1e-260), ``S^p Q`` is rank one
    to rounding, so only the leading column is the top eigenvector; the rest is an orthonormal complement."""
    gen = torch.Generator().manual_seed(11)
    s, _, _ = spd_with_spectrum(6, gen)
    q = random_orthogonal(6, gen).unsqueeze(0)
    basis = bases.QRPowerStep(every=1, power=200).refresh(s.unsqueeze(0), q).basis[0]
    torch.testing.assert_close(basis.T @ basis, torch.eye(6, dtype=F64), rtol=0, atol=1e-12)
    _, vectors = descending_eigh_reference(s)
    assert abs(float(vectors[:, 0] @ basis[:, 0])) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_power_steps_of_a_tiny_or_huge_float32_factor_neither_underflow_nor_overflow(scale):
    """``S^4`` of a factor of size 1e-30 is 1e-120 (below float32's range), of 1e30 it is 1e120: the rescaled
    products give the basis of the unscaled factor."""
    gen = torch.Generator().manual_seed(3)
    s, _, _ = spd_with_spectrum(6, gen, top=1.0, bottom=0.2)
    q = random_orthogonal(6, gen).unsqueeze(0)
    expected = bases.QRPowerStep(every=1, power=4).refresh(s.unsqueeze(0), q).basis[0]
    got = bases.QRPowerStep(every=1, power=4).refresh((scale * s).float().unsqueeze(0), q.float()).basis[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.to(F64), expected, rtol=0, atol=1e-4)


def test_power_two_leaves_less_off_diagonal_energy_than_one_step():
    """Near an eigenbasis (the exact one rotated by exp(0.1·K), K skew): each product contracts the error, so the
    relative off-diagonal norm r of ``QᵀSQ`` after ``p = 2`` is below that after ``p = 1``, below the start's."""
    from precond.drift import offdiagonal_ratio
    gen = torch.Generator().manual_seed(7)
    s, u, _ = spd_with_spectrum(8, gen, top=1.0, bottom=0.01)
    k = torch.randn(8, 8, generator=gen, dtype=F64)
    start = (u @ torch.linalg.matrix_exp(0.1 * (k - k.T))).unsqueeze(0)
    ratios = [offdiagonal_ratio(s.unsqueeze(0), start).item()]
    for power in (1, 2):
        basis = bases.QRPowerStep(every=1, power=power).refresh(s.unsqueeze(0), start).basis
        ratios.append(offdiagonal_ratio(s.unsqueeze(0), basis).item())
    assert ratios[0] > ratios[1] > ratios[2] > 0, ratios


def test_power_keeps_the_basis_of_an_all_zero_factor():
    gen = torch.Generator().manual_seed(1)
    q = random_orthogonal(5, gen).unsqueeze(0)
    kept = bases.QRPowerStep(every=1, power=3).refresh(torch.zeros(1, 5, 5, dtype=F64), q).basis
    assert torch.equal(kept, q)


@pytest.mark.parametrize("power", [0, -1, 1.5, True, "2"])
def test_power_must_be_a_positive_integer(power):
    with pytest.raises((ValueError, TypeError), match="the products of S before each QR"):
        bases.QRPowerStep(every=10, power=power)


# --- QRPowerStep(sort=True) ---------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 10), seed=seeds, perm_seed=seeds)
def test_sorted_refresh_of_shuffled_eigenbasis_returns_descending_eigenbasis(d, seed, perm_seed):
    gen = torch.Generator().manual_seed(seed)
    s, u, lam = spd_with_spectrum(d, gen)  # u: columns in descending eigenvalue order
    shuffle = torch.randperm(d, generator=torch.Generator().manual_seed(perm_seed))
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    old = (u[:, shuffle] * signs).unsqueeze(0)
    result = bases.QRPowerStep(every=1, sort=True).refresh(s.unsqueeze(0), old)
    assert result.permutation is not None
    perm = result.permutation[0]
    assert perm.shape == (d,)
    assert sorted(perm.tolist()) == list(range(d))
    # the columns in descending Rayleigh order are the eigenvectors in descending order: perm inverts shuffle
    assert torch.equal(shuffle[perm], torch.arange(d))
    # the new basis is the descending eigenbasis, up to column sign …
    _, ref_vectors = descending_eigh_reference(s)
    assert_same_columns_up_to_sign(result.basis[0], ref_vectors, atol=1e-8)
    # … and, with S SPD and the diag(R) ≥ 0 convention, exactly the old columns moved: new[:, i] = old[:, perm[i]]
    torch.testing.assert_close(result.basis[0], old[0][:, perm], rtol=0, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 8), batch=st.sampled_from([1, 2]), seed=seeds)
def test_sorted_refresh_of_generic_basis_orders_by_rayleigh_quotient(d, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.stack([spd_with_spectrum(d, gen, top=3.0, bottom=0.2)[0] for _ in range(batch)])
    q = torch.stack([random_orthogonal(d, gen) for _ in range(batch)])
    result = bases.QRPowerStep(every=1, sort=True).refresh(s, q)
    for b in range(batch):
        perm = result.permutation[b]
        assert sorted(perm.tolist()) == list(range(d))
        rayleigh = torch.diagonal(q[b].T @ s[b] @ q[b])
        ordered = rayleigh[perm]
        assert torch.all(ordered[:-1] >= ordered[1:])  # descending
        expected = qr_positive_reference(s[b] @ q[b][:, perm])
        torch.testing.assert_close(result.basis[b], expected, rtol=0, atol=1e-10)


# --- sign convention -------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 10), seed=seeds, sort=st.booleans(), dtype=st.sampled_from([F64, torch.float32]))
def test_exact_eigenbasis_is_a_fixed_point_without_sign_flips(d, seed, sort, dtype):
    gen = torch.Generator().manual_seed(seed)
    s, u, _ = spd_with_spectrum(d, gen)
    # a descending eigenbasis with arbitrary column signs
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    q0 = (u * signs).to(dtype).unsqueeze(0)
    refresher = bases.QRPowerStep(every=1, sort=sort)
    first = refresher.refresh(s.to(dtype).unsqueeze(0), q0)
    second = refresher.refresh(s.to(dtype).unsqueeze(0), first.basis)
    tol = 1e-10 if dtype == F64 else 2e-5
    torch.testing.assert_close(first.basis, q0, rtol=0, atol=tol)
    torch.testing.assert_close(second.basis, q0, rtol=0, atol=tol)
    if sort:
        assert torch.equal(first.permutation[0], torch.arange(d))


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 8), seed=seeds)
def test_refresh_has_nonnegative_r_diagonal(d, seed):
    """``R = Q_newᵀ (S Q_old)`` is upper triangular with a nonnegative diagonal."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=F64)
    s = a @ a.T + 0.1 * torch.eye(d, dtype=F64)
    q = random_orthogonal(d, gen)
    new = bases.QRPowerStep(every=1).refresh(s.unsqueeze(0), q.unsqueeze(0)).basis[0]
    r = new.T @ (s @ q)
    torch.testing.assert_close(torch.tril(r, diagonal=-1), torch.zeros(d, d, dtype=F64), rtol=0, atol=1e-9)
    assert torch.all(torch.diagonal(r) >= 0)


# --- Eigh ------------------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 10), batch=st.sampled_from([1, 2, 3]), seed=seeds, dtype=st.sampled_from([F64, torch.float32]))
def test_eigh_initialize_returns_descending_eigenpairs(d, batch, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    mats = [spd_with_spectrum(d, gen, top=float(b + 1), bottom=0.05 * (b + 1)) for b in range(batch)]
    s = torch.stack([m[0] for m in mats])
    result = bases.Eigh(every=5).initialize(s.to(dtype))
    assert result.basis.shape == (batch, d, d) and result.eigenvalues.shape == (batch, d)
    assert result.basis.dtype == dtype and result.eigenvalues.dtype == dtype
    assert result.permutation is None
    tol = 1e-10 if dtype == F64 else 1e-4
    for b in range(batch):
        ref_values, ref_vectors = descending_eigh_reference(s[b])
        torch.testing.assert_close(result.eigenvalues[b].to(F64), ref_values, rtol=tol, atol=tol)
        torch.testing.assert_close(result.eigenvalues[b].to(F64), mats[b][2], rtol=tol, atol=tol)
        values = result.eigenvalues[b]
        assert torch.all(values[:-1] >= values[1:])
        assert_same_columns_up_to_sign(result.basis[b], ref_vectors, atol=tol * 10)
        qb = result.basis[b].to(F64)
        torch.testing.assert_close(s[b] @ qb, qb * result.eigenvalues[b].to(F64), rtol=0, atol=tol * 10)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 8), seed=seeds)
def test_eigh_refresh_equals_initialize_for_nonzero_factor(d, seed):
    gen = torch.Generator().manual_seed(seed)
    s, _, lam = spd_with_spectrum(d, gen)
    previous = random_orthogonal(d, gen).unsqueeze(0)
    result = bases.Eigh(every=1).refresh(s.unsqueeze(0), previous)
    torch.testing.assert_close(result.eigenvalues[0], lam, rtol=1e-10, atol=1e-12)
    _, ref_vectors = descending_eigh_reference(s)
    assert_same_columns_up_to_sign(result.basis[0], ref_vectors, atol=1e-8)


# --- all-zero factors keep the previous basis ---------------------------------------------------------------------
REFRESHERS = [bases.Eigh(every=1), bases.QRPowerStep(every=1), bases.QRPowerStep(every=1, sort=True),
              bases.Refine(every=1), bases.Refine(every=1, sort=True)]


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 8), seed=seeds, refresher=st.sampled_from(REFRESHERS), dtype=st.sampled_from([F64, torch.float32])
)
def test_zero_factor_keeps_previous_basis(d, seed, refresher, dtype):
    gen = torch.Generator().manual_seed(seed)
    previous = random_orthogonal(d, gen).to(dtype).unsqueeze(0)
    result = refresher.refresh(torch.zeros(1, d, d, dtype=dtype), previous.clone())
    if result.permutation is None:
        assert torch.equal(result.basis, previous)
    else:
        # whatever order was chosen for tied (zero) Rayleigh quotients, columns must move consistently
        assert torch.equal(result.basis[0], previous[0][:, result.permutation[0]])
    assert torch.all(torch.isfinite(result.basis))


@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 8), seed=seeds, refresher=st.sampled_from(REFRESHERS[:2]))
def test_zero_factor_in_a_batch_only_freezes_its_own_entry(d, seed, refresher):
    gen = torch.Generator().manual_seed(seed)
    s, _, _ = spd_with_spectrum(d, gen)
    factor = torch.stack([torch.zeros(d, d, dtype=F64), s])
    previous = torch.stack([random_orthogonal(d, gen), random_orthogonal(d, gen)])
    result = refresher.refresh(factor, previous.clone())
    assert torch.equal(result.basis[0], previous[0])
    if isinstance(refresher, bases.Eigh):
        _, ref_vectors = descending_eigh_reference(s)
        assert_same_columns_up_to_sign(result.basis[1], ref_vectors, atol=1e-8)
    else:
        torch.testing.assert_close(result.basis[1], qr_positive_reference(s @ previous[1]), rtol=0, atol=1e-10)


# --- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [bases.QRPowerStep, bases.Eigh, bases.CholeskyQR, bases.Refine])
@pytest.mark.parametrize("every", [0, -1, 1.5, True, "10", None])
def test_every_must_be_a_positive_integer(cls, every):
    with pytest.raises(ValueError, match="every"):
        cls(every=every)


@pytest.mark.parametrize("cls", [bases.QRPowerStep, bases.Eigh, bases.CholeskyQR, bases.Refine])
def test_every_accepts_positive_integers(cls):
    assert cls(every=1).every == 1
    assert cls(every=7).every == 7


def test_identity_keeps_the_identity_basis_and_has_no_period():
    """``Q_k = I`` forever: nothing to schedule (``every`` is None, the protocol's "never refreshes"); its eigenvalue
    estimates are ``diag(S)``."""
    assert bases.Identity().every is None
    s = random_spd(4, torch.Generator().manual_seed(0)).unsqueeze(0)
    result = bases.Identity().refresh(s, torch.eye(4, dtype=torch.float64)[None])
    assert torch.equal(result.basis[0], torch.eye(4, dtype=torch.float64))
    assert torch.equal(result.spectrum(s)[0], torch.diagonal(s[0]))


def test_eigh_ladder_treats_nan_output_as_failure(monkeypatch):
    """Named bug: LAPACK's eigh returned NaN eigenvectors (no exception) for a rank-deficient embedding factor
    with one thread; the basis must never become NaN. Rungs: jitter, float64, keep the old basis."""
    from bases.eigh import descending_eigh
    from precond.fallbacks import FallbackCounter

    real = torch.linalg.eigh
    s = torch.diag(torch.tensor([3.0, 2.0, 0.0, 0.0]))[None]

    def nan_in_float32(matrix):
        values, vectors = real(matrix)
        return (values, vectors * float("nan")) if matrix.dtype == torch.float32 else (values, vectors)

    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    counter = FallbackCounter()
    with pytest.warns(RuntimeWarning):
        result = descending_eigh(s, counter)
    assert torch.isfinite(result.basis).all() and result.basis.dtype == torch.float32
    torch.testing.assert_close(result.eigenvalues[0, :2], torch.tensor([3.0, 2.0]), rtol=1e-5, atol=1e-5)
    assert counter.as_dict() == {"eigh_jitter": 1, "eigh_float64": 1}

    def always_fails(matrix):
        raise torch.linalg.LinAlgError("no convergence")

    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    previous = torch.eye(4)[None].flip(-1)
    with pytest.warns(RuntimeWarning):
        kept = descending_eigh(s, counter, previous=previous)
    assert torch.equal(kept.basis, previous)
    with pytest.warns(RuntimeWarning):
        initial = descending_eigh(s, FallbackCounter())
    assert torch.equal(initial.basis[0], torch.eye(4))
