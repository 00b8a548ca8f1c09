"""The speed levers keep the math: Cholesky-QR gives QR's basis, staggering refreshes every unit every T steps
at its own phase, the asynchronous schedule installs the same refresh one step later, on any device."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bases
import precond
from bases.qr_power_step import sign_fixed_qr
from precond.fallbacks import FallbackCounter

import trajectory_cases
from reference import F64, random_orthogonal
from strategies import seeds


def _spd_with_basis(d, gen, dtype=F64):
    u = random_orthogonal(d, gen)
    values = torch.logspace(0, -3, d, dtype=F64)
    return (u @ torch.diag(values) @ u.T).to(dtype), u


@given(d=st.integers(1, 30), batch=st.integers(1, 3), seed=seeds, noise=st.sampled_from([0.0, 1e-3, 0.05]))
def test_cholesky_qr_gives_the_qr_basis(d, batch, seed, noise):
    """Near the eigenbasis (the regime after warm-up) Cholesky-QR2 returns the same ``Q`` as Householder QR
    with ``diag(R) ≥ 0``: the Q factor is unique, only the algorithm differs."""
    gen = torch.Generator().manual_seed(seed)
    factors, current = [], []
    for _ in range(batch):
        s, u = _spd_with_basis(d, gen)
        perturbed, _ = torch.linalg.qr(u + noise * torch.randn(d, d, generator=gen, dtype=F64))
        factors.append(s)
        current.append(perturbed)
    s, q = torch.stack(factors), torch.stack(current)
    refresher = bases.CholeskyQR(warmup=0, shift=1e-9)
    got = refresher.refresh(s, q, index=5).basis
    shift = 1e-9 * torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).view(-1, 1, 1) / d
    want = sign_fixed_qr(s @ q + shift * q)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)
    eye = torch.eye(d, dtype=F64).expand(batch, d, d)
    torch.testing.assert_close(got.transpose(-2, -1) @ got, eye, rtol=0, atol=1e-12)


@given(d=st.integers(2, 24), seed=seeds, error=st.sampled_from([1e-4, 1e-3, 1e-2]))
def test_an_inexact_first_gram_matrix_leaves_the_cholesky_qr2_basis_unchanged(d, seed, error):
    """The claim behind ``fast_grams`` (``bases.cholesky_qr.cholesky_orthonormalize``), in float64: pass 1 factored
    from a Gram matrix perturbed by a relative ``error`` (as TF32 rounds it) still gives, after an exact pass 2,
    Householder QR's Q factor (diag(R) > 0), because ``Y L₁⁻ᵀ L₂⁻ᵀ`` stays ``Y`` times an upper triangular matrix.
    It needs ``Y`` well conditioned after column scaling (near the eigenbasis, the regime after warm-up); elsewhere
    the factorisation fails and the refresh keeps its old basis (tested above)."""
    gen = torch.Generator().manual_seed(seed)
    s, u = _spd_with_basis(d, gen)
    y = s @ torch.linalg.qr(u + 1e-5 * torch.randn(d, d, generator=gen, dtype=F64))[0]  # near the eigenbasis
    y = y / torch.linalg.vector_norm(y, dim=0, keepdim=True)
    noise = torch.randn(d, d, generator=gen, dtype=F64)
    gram = y.T @ y
    inexact = gram + error * (noise + noise.T) / 2 * gram.diagonal().sqrt().outer(gram.diagonal().sqrt())
    first = torch.linalg.solve_triangular(torch.linalg.cholesky(inexact), y.T, upper=False).T
    second = torch.linalg.solve_triangular(torch.linalg.cholesky(first.T @ first), first.T, upper=False).T
    torch.testing.assert_close(second, sign_fixed_qr(y), rtol=0, atol=1e-10)


@pytest.mark.gpu
def test_fast_grams_give_the_float32_basis_on_cuda():
    """``tf32=True`` (two TF32 Gram matrices in Cholesky-QR2) gives the full-float32 refresh's basis to float32
    round-off on CUDA, and accepts it."""
    gen = torch.Generator().manual_seed(0)
    factors, current = [], []
    for _ in range(3):
        s, u = _spd_with_basis(256, gen)
        factors.append(s)
        current.append(torch.linalg.qr(u + 1e-3 * torch.randn(256, 256, generator=gen, dtype=F64))[0])
    s, q = (torch.stack(x).float().cuda() for x in (factors, current))
    refresher = bases.CholeskyQR(warmup=0)
    with precond.precision.tf32_matmuls(False):
        exact = refresher.refresh(s, q, index=5).basis
    with precond.precision.tf32_matmuls(True):
        fast = refresher.refresh(s, q, index=5).basis
    assert not torch.equal(exact, q) and not torch.equal(fast, q)  # both refreshed (no kept old basis)
    torch.testing.assert_close(fast, exact, rtol=0, atol=2e-5)


def test_cholesky_qr_converges_like_qr_in_float32():
    gen = torch.Generator().manual_seed(0)
    s, u = _spd_with_basis(24, gen, torch.float32)
    q_chol = q_qr = random_orthogonal(24, gen, torch.float32)[None]
    refresher, qr = bases.CholeskyQR(), bases.QRPowerStep()
    for i in range(400):
        q_chol = refresher.refresh(s[None], q_chol, index=i).basis
        q_qr = qr.refresh(s[None], q_qr).basis
    eye = torch.eye(24)
    for q in (q_chol[0], q_qr[0]):
        torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=2e-5)
        alignment = (u.float().T @ q).abs().diagonal()  # descending eigenvectors, up to sign
        assert alignment.min() > 0.999


def test_cholesky_qr_keeps_the_old_basis_when_the_factor_is_not_finite_and_counts_it():
    # the shifted passes make every finite factor factorable; a non-finite one must not replace the basis
    s = torch.diag(torch.tensor([1.0, float("nan"), 1e-3], dtype=F64))[None]
    q = torch.eye(3, dtype=F64)[None]
    q[0, :, 2] = q[0, :, 1] + 1e-12  # nearly parallel columns: not a basis the refresh may return unchanged by luck
    counter = FallbackCounter()
    refresher = bases.CholeskyQR(warmup=0, shift=1e-30)
    result = refresher.refresh(s, q, counter, index=3).basis
    assert torch.equal(result, q)
    assert counter.as_dict()["cholesky_qr_kept_old_basis"] == 1
    # during warm-up the Householder QR is used, and on a finite factor it succeeds
    finite = torch.diag(torch.tensor([1.0, 1e-30, 1e-30], dtype=F64))[None]
    warm = bases.CholeskyQR(warmup=1, shift=1e-30).refresh(finite, q, counter, index=0).basis
    torch.testing.assert_close(warm[0].T @ warm[0], torch.eye(3, dtype=F64), rtol=0, atol=1e-12)


def _shapes_model():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*shape, dtype=F64)) for shape in
            [(6, 5), (6, 5), (4, 3, 2), (7,), (8, 8), (3, 9)]]


@pytest.mark.parametrize("every", [1, 3, 4])
def test_stagger_refreshes_every_unit_every_T_steps_at_its_own_phase(every):
    params = _shapes_model()
    opt = precond.kl_shampoo(params, lr=1e-3, every=every, stagger=True, state_dtype=F64)
    gen = torch.Generator().manual_seed(1)
    history: dict[tuple[int, str], list[int]] = {}
    previous = {}
    for step in range(1, 3 * every + 3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
        opt.step()
        if step == 1:  # first step: statistics only
            previous = {(i, k): q.clone() for i, p in enumerate(params) for k, q in opt.state[p]["basis"]["Q"].items()}
            continue
        t = step - 1  # update count
        for i, p in enumerate(params):
            for k, q in opt.state[p]["basis"]["Q"].items():
                if not torch.equal(q, previous[(i, k)]):
                    history.setdefault((i, k), []).append(t)
                previous[(i, k)] = q.clone()
    loads = [0] * every
    for i, p in enumerate(params):
        for k in opt.state[p]["basis"]["Q"]:
            o = opt.refresh_offset(p, int(k))
            assert 0 <= o < every
            loads[o] += opt.layout(p).view_shape[int(k)] ** 3
            due = [t for t in range(1, 3 * every + 2) if (t + o) % every == 0]
            assert history.get((i, k), []) == due
    assert max(loads) - min(loads) <= 8**3  # greedy balance: within the largest unit


@pytest.mark.parametrize("every", [1, 2])
def test_async_schedule_installs_each_refresh_one_step_later(every):
    """Reference written with the preconditioner's own parts: at a due step the refresh is computed from the
    folded ``S`` and the current ``Q``, and installed only before the next update."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(5, 4, generator=gen, dtype=F64) for _ in range(7)]
    p = torch.nn.Parameter(torch.zeros(5, 4, dtype=F64))
    opt = precond.kl_shampoo([p], lr=1.0, betas=(0.0, 0.9), every=every, async_refresh=True, state_dtype=F64)
    pc = opt.param_groups[0]["preconditioner"]
    layout = pc.plan((5, 4))
    weight = torch.zeros(5, 4, dtype=F64)
    state, pending = None, []
    for t, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        batch = g[None]
        if state is None:
            state = pc.init_state(batch, layout)
            continue
        for k, result in pending:
            pc.install_refresh(state, k, result, layout)
        pending = []
        # update from the pre-step state, then fold
        weight = weight - pc.precondition(state, batch, batch, layout, t)[0]
        if t % every == 0:
            pending = [(k, pc.compute_refresh(state.S[k], state.Q[k], index=t // every - 1)) for k in (0, 1)]
        torch.testing.assert_close(p.detach(), weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset", trajectory_cases.PRESETS)
def test_async_refresh_gives_exactly_the_synchronous_updates(preset):
    """Nothing reads Q or λ between an asynchronous launch and its install before the next update, so the
    trajectory equals the synchronous one bit for bit (CPU: same code path as CUDA, minus the streams)."""
    runs = []
    for asynchronous in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64)) for shape in [(4, 5), (3, 2, 4)]]
        opt = getattr(precond, preset)(params, lr=1e-2, every=2, stagger=True, async_refresh=asynchronous,
                                       state_dtype=F64)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            opt.step()
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"async_refresh": True, "stagger": True}, {"tf32": True}])
def test_fast_paths_on_cuda_match_cpu(options):
    """Float64 on both devices (TF32 only touches float32, so that case runs in float32 with a loose bound).

    Every factor is full rank from the first gradient on (``d_k ≤ D_{-k}``): a rank-deficient first factor has a
    degenerate null space whose basis ``eigh`` picks differently on each device, a legitimate difference."""
    torch.manual_seed(0)
    dtype = torch.float32 if options.get("tf32") else F64
    shapes = [(40, 40), (40, 40), (48,), (16, 8, 3, 3)]
    init = [torch.randn(s, dtype=dtype) * 0.1 for s in shapes]
    runs = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        opt = precond.kl_shampoo(params, lr=1e-2, every=3, state_dtype=torch.float32 if dtype == torch.float32 else F64,
                                 **options)
        gen = torch.Generator().manual_seed(3)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
            opt.step()
        runs[device] = [p.detach().cpu() for p in params]
    tolerance = 5e-3 if options.get("tf32") else 1e-6
    for a, b in zip(runs["cpu"], runs["cuda"], strict=True):
        difference = (a - b).abs().max().item()
        assert difference <= tolerance * max(1.0, a.abs().max().item()), f"CPU and CUDA differ by {difference:.3g}"


def test_refused_step_leaves_pending_refreshes_and_state_alone():
    """A NaN gradient refuses the step before anything moves, also a refresh waiting to be installed."""
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    opt = precond.kl_shampoo([p], every=1, async_refresh=True)
    for _ in range(3):
        p.grad = torch.randn(6, 5, generator=gen)
        opt.step()
    assert opt.pending_refreshes() > 0
    before = {k: v.clone() for k, v in opt.state[p]["basis"]["Q"].items()}
    p.grad = torch.full((6, 5), float("nan"))
    with pytest.raises(FloatingPointError):
        opt.step()
    assert opt.pending_refreshes() > 0
    assert all(torch.equal(before[k], v) for k, v in opt.state[p]["basis"]["Q"].items())
    p.grad = torch.randn(6, 5, generator=gen)
    opt.step()
    assert torch.isfinite(p).all()
