"""``bases.Refine``: the basis refresh from matrix products alone (warm-started Ogita–Aishima refinement).

Quality, against float64 references from ``torch.linalg.eigh`` and against ``QRPowerStep`` after the same refreshes,
on SPD factors with realistic spectra (power-law decay, a clustered tail) and on drifting sequences
``S_t = β S_{t−1} + (1 − β) G_t G_tᵀ / n`` whose gradients' covariance slowly rotates. The two measures, always in
float64:

- orthogonality ``‖QᵀQ − I‖_F``;
- off-diagonal energy ``‖offdiag(QᵀSQ)‖_F / ‖diag(QᵀSQ)‖₂`` (0 for an eigenbasis).

The bounds stated (and derived in ``bases/refine.py``):

1. A sweep's orthonormalisation leaves ``‖I − QᵀQ‖_F ≤ (5/8)ε³(1 + ε) + 2⁻¹⁴`` (ε: the defect it started from,
   ``≤ ‖W‖₂⁶/72 ≤ 1/72`` plus the input's and round-off; ``2⁻¹⁴``: float32 round-off of a ``d ≤ 256`` orthonormal
   matrix, above Householder QR's own, measured 2e-6 to 5e-6).
2. From a close start on a fixed factor the refinement converges quadratically: ``off₁ ≤ off₀²`` on a spectrum of
   relative gaps ≥ 0.15 (measured 0.89–0.91 off₀²), for both the local damping and the paper's threshold (the latter
   only once ε is small enough for its ω to pass every pair).
3. Operands rounded to ``u`` (TF32 ``2⁻¹¹``, bfloat16 ``2⁻⁸``) hold an eigenbasis to off-diagonal energy ``≤ 2u``
   (measured 0.8u); full float32 to ``2⁻²⁰``.
4. On drifting factors, two sweeps per refresh give less off-diagonal energy than one QR power step per refresh
   after 1, 5 and 20 refreshes, at every drift tried; one sweep does where the drift is the EMA's sampling noise.
   Near an eigenbasis one refresh removes at least three quarters of the off-diagonal energy.
5. The paper's single threshold ω freezes a warm-started basis under drift (off-diagonal energy after 20 refreshes
   ≥ half that of a basis never refreshed), where the local damping does not.

CPU runs emulate the tensor-core rounding (``bases.refine.product``), so these bounds are the GPU's; the ``gpu``
test checks them on CUDA against the CPU float64 reference.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases
from bases.refine import gram, refine_sweep, round_to_bfloat16, round_to_tf32, valid
from precond.fallbacks import FallbackCounter

from reference import random_orthogonal, random_spd

F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)
UNIT = {"tf32": 2.0**-11, "bfloat16": 2.0**-8}
FLOAT32_ORTHOGONALITY = 2.0**-14


# --- float64 measures and references -----------------------------------------------------------------------------
def orthogonality(q: torch.Tensor) -> float:
    q = q.to(F64)
    return float(torch.linalg.matrix_norm(q.mT @ q - torch.eye(q.shape[-1], dtype=F64)).max())


def off_diagonal_energy(s: torch.Tensor, q: torch.Tensor) -> float:
    m = q.to(F64).mT @ s.to(F64) @ q.to(F64)
    diagonal = torch.diagonal(m, dim1=-2, dim2=-1)
    off = torch.linalg.matrix_norm(m - torch.diag_embed(diagonal))
    return float((off / torch.linalg.vector_norm(diagonal, dim=-1)).max())


def descending_eigenbasis(s: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(s.to(F64))[1].flip(-1)


def power_law(d: int, alpha: float = 1.5, tail: float = 0.25, floor: float = 1e-4,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """``λ_i = (i + 1)^(−α)``, the last ``tail`` of them a cluster at ``floor`` (spread 1 %)."""
    lam = (torch.arange(d, dtype=F64) + 1) ** -alpha
    start = d - int(d * tail)
    jitter = torch.rand(d - start, generator=gen, dtype=F64) if gen is not None else torch.linspace(0, 1, d - start)
    lam[start:] = floor * (1 + 0.01 * jitter.to(F64))
    return lam


def qr_power_step(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return bases.QRPowerStep(every=1).refresh(s, q).basis


DRIFTS = {"noise": 0.0, "slow": 0.01, "fast": 0.03}
"""Per-step rotation of the gradients' covariance (``exp(rate K)``, ``K`` antisymmetric of spectral norm ~√2): none
(the EMA's sampling noise alone), slow, fast. A basis never refreshed reaches off-diagonal energy ~0.06, ~4, ~4
after 200 steps at d = 128."""
EVERY, BETA, REFRESHES = 10, 0.95, 20


@functools.lru_cache(maxsize=None)
def drifting_factors(d: int, drift: str, alpha: float = 1.5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``S_T, S_2T, …, S_(REFRESHES+1)T`` (float64) of ``S_t = β S_{t−1} + (1 − β) G Gᵀ / n``, ``G = U_t Λ^½ Z``
    (``n = max(d/4, 4)`` samples, ``Z`` standard normal) and ``U_t = exp(rate K) U_{t−1}``."""
    gen = torch.Generator().manual_seed(seed)
    lam = power_law(d, alpha, gen=gen)
    u = random_orthogonal(d, gen)
    k = torch.randn(d, d, generator=gen, dtype=F64)
    turn = torch.linalg.matrix_exp(DRIFTS[drift] * (k - k.T) / math.sqrt(2 * d))
    n = max(d // 4, 4)
    s = (u * lam) @ u.T
    out = []
    for t in range(1, (REFRESHES + 1) * EVERY + 1):
        u = turn @ u
        g = u @ (lam.sqrt().unsqueeze(-1) * torch.randn(d, n, generator=gen, dtype=F64))
        s = BETA * s + (1 - BETA) * (g @ g.T) / n
        if t % EVERY == 0:
            out.append(s)
    return tuple(out)


def track(d: int, drift: str, refreshers: dict, dtype=torch.float32, at=(1, 5, 20)) -> dict:
    """Start every refresher from ``eigh``'s basis of ``S_T``, refresh it at ``S_{(k+1)T}`` for k = 1 … 20; the
    measures after the refreshes in ``at`` (and of eigh's own basis, and of the start never refreshed)."""
    factors = drifting_factors(d, drift)
    start = descending_eigenbasis(factors[0]).to(dtype).unsqueeze(0)
    bases_now = {name: start.clone() for name in refreshers}
    out: dict = {}
    for k in range(1, REFRESHES + 1):
        s = factors[k].unsqueeze(0)
        for name, refresh in refreshers.items():
            bases_now[name] = refresh(s.to(dtype), bases_now[name])
        if k in at:
            row = {name: (off_diagonal_energy(s, q), orthogonality(q)) for name, q in bases_now.items()}
            row["eigh"] = (off_diagonal_energy(s, descending_eigenbasis(s)), 0.0)
            row["stale"] = (off_diagonal_energy(s, start), orthogonality(start))
            out[k] = row
    return out


def refine(**options):
    part = bases.Refine(every=1, **options)
    return lambda s, q: part.refresh(s, q).basis


def orthonormalisation_bound(defect: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound 1: ``(5/8)ε³(1 + ε)`` plus the float32 (or float64) round-off floor."""
    eps = defect.to(F64)
    return 0.625 * eps**3 * (1 + eps) + (1e-13 if dtype == F64 else FLOAT32_ORTHOGONALITY)


def checked_refine(sweeps: int = 2, damping: str = "local"):
    """``Refine``'s sweeps one by one, checking that each is valid (no fallback: unlike ``CholeskyQR``, whose
    Cholesky fails on 33 of the 120 refreshes of the captured, rank-deficient factors below) and bound 1."""
    def run(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        for _ in range(sweeps):
            q, defect, _ = refine_sweep(s, q, "tf32", damping)
            assert torch.all(valid(q, defect)), defect
            assert torch.all(orthogonality_each(q) <= orthonormalisation_bound(defect, q.dtype)), defect
        return q
    return run


def orthogonality_each(q: torch.Tensor) -> torch.Tensor:
    q = q.to(F64)
    return torch.linalg.matrix_norm(q.mT @ q - torch.eye(q.shape[-1], dtype=F64))


# --- the trap: a polar step never moves the basis ----------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 12), seed=seeds)
def test_polar_factor_of_s_q_is_q_for_every_orthogonal_q(d, seed):
    """``S Q = Q (QᵀSQ)`` with ``QᵀSQ`` SPD is ``S Q``'s polar decomposition: orthogonalising ``S Q`` by a polar
    (Newton–Schulz) iteration returns ``Q`` whatever ``Q`` is, so it cannot be a refresh."""
    gen = torch.Generator().manual_seed(seed)
    s, q = random_spd(d, gen), random_orthogonal(d, gen)
    u, _, vh = torch.linalg.svd(s @ q)
    torch.testing.assert_close(u @ vh, q, rtol=0, atol=1e-10)


# --- rounding helpers ------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=seeds, scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
def test_tf32_and_bfloat16_rounding(seed, scale):
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * scale
    t = round_to_tf32(x)
    assert torch.all(t.view(torch.int32) & 0x1FFF == 0)  # 10 stored mantissa bits left
    assert torch.all((t - x).abs() <= 2.0**-11 * x.abs())
    b = round_to_bfloat16(x)
    assert torch.all((b - x).abs() <= 2.0**-8 * x.abs())


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 64), seed=seeds)
def test_split_gram_is_float32_accurate(d, seed):
    """``gram(X, "tf32")`` from TF32-rounded operands (two products) is within ``2⁻¹⁹`` of ``XᵀX``: enough to
    check and restore orthogonality to float32's level."""
    x = random_orthogonal(d, torch.Generator().manual_seed(seed)).float().unsqueeze(0)
    exact = x.to(F64).mT @ x.to(F64)
    assert float((gram(x, "tf32").to(F64) - exact).abs().max()) <= 2.0**-19


# --- convergence on a fixed factor -----------------------------------------------------------------------------------
def geometric_factor(d: int, gen: torch.Generator, bottom: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    u = random_orthogonal(d, gen)
    lam = bottom ** (torch.arange(d, dtype=F64) / max(d - 1, 1))
    return ((u * lam) @ u.T).unsqueeze(0), u


@pytest.mark.parametrize("damping", ["local", "paper"])
def test_one_sweep_converges_quadratically_from_a_close_start(damping):
    """Bound 2: ``X = U exp(εK)`` (``U`` the eigenbasis, ``‖K‖₂ = 1``): one float64 sweep leaves ``off₁ ≤ off₀²``
    once ε is small enough for the paper's threshold to pass every pair (ε ≤ 6e-3 here; the local damping from
    ε = 0.1 on)."""
    gen = torch.Generator().manual_seed(2)
    s, u = geometric_factor(16, gen)  # relative gaps 1 − 0.05^(1/15) ≈ 0.18
    k = torch.randn(16, 16, generator=gen, dtype=F64)
    k = (k - k.T) / torch.linalg.matrix_norm(k - k.T, ord=2)
    for eps in ((0.1, 0.05, 0.025, 0.0125, 0.006) if damping == "local" else (0.006, 0.003)):
        x = (u @ torch.linalg.matrix_exp(eps * k)).unsqueeze(0)
        before = off_diagonal_energy(s, x)
        after = off_diagonal_energy(s, refine_sweep(s, x, "float32", damping)[0])
        assert after <= before**2, (eps, before, after)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 24), seed=seeds, angle=st.floats(0.0, 0.3), sort=st.booleans())
def test_refreshes_converge_to_the_eigh_basis_of_a_fixed_factor(d, seed, angle, sort):
    """From a start within ``angle`` (radians, ``‖·‖₂``) of the descending eigenbasis of a factor with relative gaps
    ≥ 0.12, eight float64 refreshes give eigh's columns (up to sign), orthonormal and diagonalising to round-off."""
    gen = torch.Generator().manual_seed(seed)
    s, u = geometric_factor(d, gen)
    k = torch.randn(d, d, generator=gen, dtype=F64)
    k = (k - k.T) / torch.linalg.matrix_norm(k - k.T, ord=2).clamp_min(1e-300)
    q = (u @ torch.linalg.matrix_exp(angle * k)).unsqueeze(0)
    part = bases.Refine(every=1, sort=sort)
    for _ in range(8):
        q = part.refresh(s, q).basis
    overlap = descending_eigenbasis(s)[0].mT @ q[0]
    torch.testing.assert_close(overlap.abs(), torch.eye(d, dtype=F64), rtol=0, atol=1e-9)
    assert orthogonality(q) <= 1e-13 and off_diagonal_energy(s, q) <= 1e-13


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("precision", ["tf32", "bfloat16", "float32"])
def test_precision_floor_at_an_eigenbasis(d, precision):
    """Bound 3: started at the exact eigenbasis of a power-law factor with a clustered tail, ten float32 refreshes
    stay within off-diagonal energy 2u (u of the operands' rounding; full float32: 2⁻²⁰) and orthonormal."""
    gen = torch.Generator().manual_seed(1)
    lam, u = power_law(d, gen=gen), random_orthogonal(d, gen)
    s = ((u * lam) @ u.T).unsqueeze(0)
    q = u.float().unsqueeze(0)
    part = bases.Refine(every=1, precision=precision)
    for _ in range(10):
        q = part.refresh(s.float(), q).basis
    assert off_diagonal_energy(s, q) <= 2 * UNIT.get(precision, 2.0**-21)
    assert orthogonality(q) <= FLOAT32_ORTHOGONALITY


# --- quality on drifting factors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("drift", list(DRIFTS))
@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_refinement_tracks_drifting_factors_better_than_a_qr_power_step(d, drift):
    """Bounds 1, 4 and 5 on the drifting sequences, float32 with TF32 products (emulated on the CPU)."""
    rows = track(d, drift, {"qr": qr_power_step, "refine2": checked_refine(), "refine1": checked_refine(1),
                            "paper": checked_refine(damping="paper")})
    for k, row in rows.items():
        off = {name: value[0] for name, value in row.items()}
        assert off["eigh"] <= off["refine2"] < off["qr"], (k, off)
        if drift == "noise":
            assert off["refine1"] < off["qr"], (k, off)
        assert off["paper"] > off["refine2"], (k, off)
    if drift == "fast":
        final = {name: value[0] for name, value in rows[REFRESHES].items()}
        assert final["paper"] >= 0.5 * final["stale"], final


@functools.lru_cache(maxsize=None)
def captured_factors() -> dict:
    """KL factors of a tiny GPT trained by the ``kl_shampoo`` preset on the standard library's sources: 12 factors
    (d = 64 to 256), a snapshot every 4 steps after 20 (``precond.bench.refine_quality``, which the device run
    uses on GPT-2 small)."""
    from precond.bench.refine_quality import capture
    from precond.bench.training import GPT_TINY

    snapshots, _ = capture("kl_shampoo", torch.device("cpu"), GPT_TINY, batch=4, length=64, every=4, max_dim=4096,
                           warmup=20, refreshes=10)
    return snapshots


def test_on_factors_captured_from_a_gpt_run():
    """Bound 4 on real factors: after 1, 5 and 10 refreshes, two sweeps leave at most half of a QR power step's
    off-diagonal energy in the median over the captured factors (measured 0.18 to 0.41) and less than it on every
    one (worst 0.75); one sweep is on a par with QR (median 0.7 to 1.1), so only its orthogonality is held."""
    ratios: dict[int, list[float]] = {1: [], 5: [], 10: []}
    for sequence in captured_factors().values():
        start = bases.Eigh(every=1).initialize(sequence[0].unsqueeze(0)).basis
        qr, two, one = start, start, start
        for k, factor in enumerate(sequence[1:], start=1):
            s = factor.unsqueeze(0)
            qr, two, one = qr_power_step(s, qr), checked_refine()(s, two), checked_refine(1)(s, one)
            if k in ratios:
                ratios[k].append(off_diagonal_energy(s, two) / off_diagonal_energy(s, qr))
    assert len(ratios[1]) == 12
    for k, values in ratios.items():
        # the median is the claim; the worst factor (rank-deficient, its small eigenvalues round-off) varies by
        # machine: 0.75 on an AMD EPYC with MKL (torch 2.13), 1.16 on an Intel Xeon (torch 2.11)
        assert sorted(values)[len(values) // 2] <= 0.5 and max(values) < 2.0, (k, values)


@settings(max_examples=20, deadline=None)
@given(d=st.integers(1, 40), batch=st.sampled_from([1, 2, 3]), seed=seeds, dtype=st.sampled_from([F64, torch.float32]),
       precision=st.sampled_from(["tf32", "bfloat16", "float32"]), near=st.booleans())
def test_a_sweep_orthonormalises_to_its_bound(d, batch, seed, dtype, precision, near):
    """Bound 1 on any SPD factor and any (near: slightly rotated eigenbasis; else random) orthonormal start."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.stack([random_spd(d, gen) for _ in range(batch)])
    if near:
        q = descending_eigenbasis(s) @ torch.linalg.matrix_exp(0.05 * _antisymmetric(batch, d, gen))
    else:
        q = torch.stack([random_orthogonal(d, gen) for _ in range(batch)])
    x, defect, permutation = refine_sweep(s.to(dtype), q.to(dtype), precision)
    assert x.shape == (batch, d, d) and x.dtype == dtype and permutation is None
    assert torch.all(defect < 0.5) and torch.isfinite(x).all()
    measured, bound = orthogonality_each(x), orthonormalisation_bound(defect, dtype)
    assert torch.all(measured <= bound), (measured, bound)


def _antisymmetric(batch: int, d: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.randn(batch, d, d, generator=gen, dtype=F64)
    return (k - k.mT) / 2


# --- conventions shared with the other refreshers ------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 10), seed=seeds, sort=st.booleans(), dtype=st.sampled_from([F64, torch.float32]))
def test_exact_eigenbasis_is_a_fixed_point(d, seed, sort, dtype):
    """An exact descending eigenbasis (any column signs) stays put: no sign flip, no reordering."""
    gen = torch.Generator().manual_seed(seed)
    s, u = geometric_factor(d, gen)
    signs = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    q0 = (u * signs).unsqueeze(0)
    result = bases.Refine(every=1, sort=sort, precision="float32").refresh(s.to(dtype), q0.to(dtype))
    torch.testing.assert_close(result.basis.to(F64), q0, rtol=0, atol=1e-12 if dtype == F64 else 1e-5)
    if sort:
        assert torch.equal(result.permutation[0], torch.arange(d))
    else:
        assert result.permutation is None
    assert result.eigenvalues is None


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 10), seed=seeds, perm_seed=seeds)
def test_sort_orders_columns_by_descending_rayleigh_quotient(d, seed, perm_seed):
    """``sort=True``: the permutation orders the old columns by ``diag(QᵀSQ)``, descending, and the refined basis
    is that reordered basis refined (a shuffled eigenbasis comes back in eigh's order)."""
    gen = torch.Generator().manual_seed(seed)
    s, u = geometric_factor(d, gen)
    shuffle = torch.randperm(d, generator=torch.Generator().manual_seed(perm_seed))
    old = u[:, shuffle].unsqueeze(0)
    result = bases.Refine(every=1, sort=True).refresh(s, old)
    perm = result.permutation[0]
    assert sorted(perm.tolist()) == list(range(d))
    assert torch.equal(shuffle[perm], torch.arange(d))
    torch.testing.assert_close(result.basis[0], u, rtol=0, atol=1e-10)


def test_columns_keep_their_place_without_sort():
    """Without ``sort`` the refinement tracks each column's eigenvector where it stands: a basis with two columns
    swapped stays swapped (and still diagonalises ``S``)."""
    gen = torch.Generator().manual_seed(3)
    s, u = geometric_factor(8, gen)
    old = u[:, [1, 0, 2, 3, 4, 5, 6, 7]].unsqueeze(0)
    result = bases.Refine(every=1).refresh(s, old)
    torch.testing.assert_close(result.basis, old, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sort", [False, True])
def test_zero_factor_keeps_its_basis_and_others_move(sort):
    gen = torch.Generator().manual_seed(4)
    s, _ = geometric_factor(6, gen)
    factor = torch.cat([torch.zeros(1, 6, 6, dtype=F64), s])
    previous = torch.stack([random_orthogonal(6, gen), random_orthogonal(6, gen)])
    result = bases.Refine(every=1, sort=sort).refresh(factor, previous.clone())
    kept = previous[0] if result.permutation is None else previous[0][:, result.permutation[0]]
    assert torch.equal(result.basis[0], kept)
    assert off_diagonal_energy(s, result.basis[1:]) < off_diagonal_energy(s, previous[1:])


def test_a_bad_factor_or_basis_keeps_the_old_basis_and_is_counted():
    """A non-finite factor, or a basis far from orthonormal (``ε ≥ 0.5``, where the orthonormalisation would not
    converge), keeps that entry's previous basis; each is counted on the device (``refine_kept_old_basis``)."""
    gen = torch.Generator().manual_seed(5)
    s = torch.stack([random_spd(5, gen) for _ in range(3)]).float()
    s[0, 1, 2] = float("nan")
    q = torch.stack([random_orthogonal(5, gen) for _ in range(3)]).float()
    q[1] *= 2.0
    counter = FallbackCounter()
    result = bases.Refine(every=1).refresh(s, q.clone(), counter)
    assert torch.equal(result.basis[:2], q[:2])
    assert not torch.equal(result.basis[2], q[2]) and orthogonality(result.basis[2:]) <= FLOAT32_ORTHOGONALITY
    assert counter.as_dict() == {"refine_kept_old_basis": 2}


def test_initialize_is_eigh():
    s = random_spd(7, torch.Generator().manual_seed(6)).unsqueeze(0)
    result = bases.Refine(every=3).initialize(s)
    torch.testing.assert_close(result.basis, bases.Eigh(every=3).initialize(s).basis, rtol=0, atol=0)
    assert result.eigenvalues is not None


@pytest.mark.parametrize("field, value", [
    ("sweeps", 0), ("sweeps", 1.5), ("sweeps", True), ("precision", "fp16"), ("precision", None),
    ("damping", "global"), ("max_rotation", 0.0), ("max_rotation", 1.5), ("max_rotation", float("nan")),
])
def test_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        bases.Refine(**{field: value})


# --- on CUDA: the same bounds, against the CPU float64 reference ----------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("precision", ["tf32", "bfloat16", "float32"])
def test_float32_matches_the_cpu_float64_reference_within_the_bounds(device, precision):
    """Float32 refreshes of a drifting d = 256 sequence, on CUDA with real tensor cores (``gpu``) and on the CPU
    with their rounding emulated: orthogonality within float32's floor, and off-diagonal energy within 2u (bound 3)
    of the float64 CPU refinement's after 1, 5 and 20 refreshes, the float64 reference itself below a QR power
    step's (bound 4)."""
    factors = drifting_factors(256, "slow")
    start = descending_eigenbasis(factors[0]).unsqueeze(0)
    part = bases.Refine(every=1, precision=precision)
    reference, on_device = start.clone(), start.float().to(device)
    qr = start.clone()
    for k in range(1, REFRESHES + 1):
        s = factors[k].unsqueeze(0)
        reference = part.refresh(s, reference).basis
        on_device = part.refresh(s.float().to(device), on_device).basis
        qr = qr_power_step(s, qr)
        if k in (1, 5, 20):
            assert orthogonality(on_device.cpu()) <= FLOAT32_ORTHOGONALITY
            expected = off_diagonal_energy(s, reference)
            assert off_diagonal_energy(s, on_device.cpu()) <= expected + 2 * UNIT.get(precision, 2.0**-21), k
            assert expected < off_diagonal_energy(s, qr), k


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 64), seed=seeds, alpha=st.floats(0.5, 2.5), angle=st.floats(1e-4, 0.2),
       dtype=st.sampled_from([F64, torch.float32]))
def test_a_refresh_near_the_eigenbasis_reduces_off_diagonal_energy(d, seed, alpha, angle, dtype):
    """From a rotated eigenbasis (``‖log‖₂ = angle``) of a power-law factor with a clustered tail, one refresh
    (two sweeps) leaves at most a quarter of the off-diagonal energy, or the precision's floor (bound 3)."""
    gen = torch.Generator().manual_seed(seed)
    lam, u = power_law(d, alpha, gen=gen), random_orthogonal(d, gen)
    s = ((u * lam) @ u.T).unsqueeze(0)
    k = _antisymmetric(1, d, gen)
    q = u @ torch.linalg.matrix_exp(angle * k / torch.linalg.matrix_norm(k, ord=2).clamp_min(1e-300))
    before = off_diagonal_energy(s, q)
    after = off_diagonal_energy(s, bases.Refine(every=1).refresh(s.to(dtype), q.to(dtype)).basis)
    assert after <= 0.25 * before + (1e-13 if dtype == F64 else 2 * UNIT["tf32"]), (before, after)
