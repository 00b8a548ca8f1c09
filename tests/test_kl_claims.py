"""The seed paper's Claims 1–3, checked against closed forms and the dense KL objective (Eq. 2).

Expectations over a set of n gradients are realised with an extra leading *sample* mode of size n that the
structure leaves as identity (``n > max_dim``): then ``Δ_k = Σ_i G_i (⊗P_j) G_iᵀ / (n D_{-k}) = E[G (⊗P_j) Gᵀ]/D_{-k}``
exactly, and iterating the estimator is the paper's fixed-point iteration (Jacobi, damped by the EMA ρ).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from precond.state import ParamState

from reference import F64, kl_objective, random_orthogonal, second_moment, unfold
from strategies import seeds


def _iterate(pc, samples, steps):
    layout = pc.plan(tuple(samples.shape))
    grad = layout.view(samples).unsqueeze(0)
    state = pc.init_state(grad, layout)
    for step in range(1, steps + 1):
        pc.absorb(state, grad, layout, step)
    return layout, state


@given(d_a=st.integers(2, 6), d_b=st.integers(2, 6), seed=seeds)
def test_claim1_one_sided_kl_optimum_is_the_second_moment(d_a, d_b, seed):
    """Claim 1: with ``S = (S_a/d_b) ⊗ I`` the KL optimum is ``S_a* = E[GGᵀ]``; our factor is ``S_a*/d_b``."""
    gen = torch.Generator().manual_seed(seed)
    n = 7
    samples = torch.randn(n, d_a, d_b, generator=gen, dtype=F64)
    pc = precond.Preconditioner(structures.NMode(max_dim=6), estimators.KL(beta=0.5, floor=0.0),
                                bases.QRPowerStep(every=5), precond.Power())
    # only mode d_a dense: the sample mode (n > max_dim) and d_b are identity modes
    layout = pc.plan(tuple(samples.shape)).with_kinds(("none", "dense", "none"))
    grad = samples.unsqueeze(0)
    state = pc.init_state(grad, layout)
    for step in range(1, 80):
        pc.absorb(state, grad, layout, step)
    s_a = state.S[1][0]
    expected = sum(g @ g.T for g in samples) / n  # E[GGᵀ]
    torch.testing.assert_close(s_a * d_b, expected, rtol=1e-9, atol=1e-12)
    # and it is the minimiser of Eq. 2 over one-sided S: random SPD perturbations only increase the objective
    sigma = second_moment(samples) + 1e-3 * torch.eye(d_a * d_b, dtype=F64)
    best = kl_objective(sigma, [s_a, torch.eye(d_b, dtype=F64)])
    for _ in range(5):
        a = torch.randn(d_a, d_a, generator=gen, dtype=F64) * 0.1
        other = torch.linalg.matrix_exp(a + a.T)
        perturbed = other @ s_a @ other.T
        assert kl_objective(sigma, [perturbed, torch.eye(d_b, dtype=F64)]) >= best - 1e-9


def test_claim1_one_sided_kl_factor_is_shampoos_over_d_minus_k():
    """One-sided KL reduces to Shampoo's factor up to the scalar ``1/D_{-k}`` on any gradient stream."""
    gen = torch.Generator().manual_seed(3)
    stream = [torch.randn(5, 3, 4, generator=gen, dtype=F64) for _ in range(12)]
    structure = structures.OneSided(side="first")
    states = []
    for estimator in (estimators.KL(beta=0.9, floor=0.0), estimators.Shampoo(beta=0.9)):
        pc = precond.Preconditioner(structure, estimator, bases.QRPowerStep(every=3), precond.Power())
        layout = pc.plan((5, 3, 4))
        state = pc.init_state(layout.view(stream[0]).unsqueeze(0), layout)
        for step, g in enumerate(stream[1:], start=1):
            pc.absorb(state, layout.view(g).unsqueeze(0), layout, step)
        states.append(state)
    torch.testing.assert_close(states[0].S[0][0] * 12, states[1].S[0][0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dims", [(3, 4), (4, 2), (2, 3, 3)])
def test_claim2_fixed_point_and_kl_no_worse_than_shampoo(dims):
    """Claim 2 (and its N-mode extension): idealized KL-Shampoo (exact ``S_j^{-1}``) converges to
    ``S_k = E[G_(k)(⊗_{j≠k} S_j^{-1})G_(k)ᵀ]/D_{-k}``, and Eq. 2 there is ≤ at Shampoo's optimally rescaled factors."""
    gen = torch.Generator().manual_seed(sum(dims))
    n = 9
    samples = torch.randn(n, *dims, generator=gen, dtype=F64)
    samples = samples * torch.linspace(0.5, 2.0, dims[0], dtype=F64).reshape(1, -1, *([1] * (len(dims) - 1)))
    pc = precond.Preconditioner(
        structures.NMode(max_dim=n - 1),
        estimators.KL(beta=0.5, init_lambda=None, floor=0.0, refresh_spectrum="reset"),
        bases.Eigh(every=1), precond.Power())
    layout, state = _iterate(pc, samples, 400)
    assert layout.kinds == ("none",) + ("dense",) * len(dims)
    factors = [state.S[k + 1][0] for k in range(len(dims))]
    for k in range(len(dims)):
        others = [torch.linalg.inv(factors[j]) for j in range(len(dims)) if j != k]
        kron = others[0] if len(others) == 1 else torch.kron(*others)
        expected = sum(unfold(g, k) @ kron @ unfold(g, k).T for g in samples) / n / (samples[0].numel() // dims[k])
        torch.testing.assert_close(factors[k], expected, rtol=1e-7, atol=1e-10)

    sigma = second_moment(samples)
    kl_fixed_point = kl_objective(sigma, factors)
    shampoo = [sum(unfold(g, k) @ unfold(g, k).T for g in samples) / n for k in range(len(dims))]
    shampoo_s = shampoo[0]
    for f in shampoo[1:]:
        shampoo_s = torch.kron(shampoo_s, f)
    c = torch.trace(sigma @ torch.linalg.inv(shampoo_s)) / sigma.shape[0]  # optimal scalar for S = c ⊗ A_k
    kl_shampoo_best = kl_objective(sigma, [c * shampoo[0], *shampoo[1:]])
    assert kl_fixed_point <= kl_shampoo_best + 1e-9
    # the fixed point is a stationary point of Eq. 2: perturbing any factor does not decrease the objective
    for k in range(len(dims)):
        a = torch.randn(dims[k], dims[k], generator=gen, dtype=F64) * 0.05
        other = torch.linalg.matrix_exp(a + a.T)
        moved = list(factors)
        moved[k] = other @ factors[k] @ other.T
        assert kl_objective(sigma, moved) >= kl_fixed_point - 1e-10


@settings(max_examples=15)
@given(d_a=st.integers(2, 5), d_b=st.integers(2, 5), seed=seeds)
def test_claim3_eigenvalues_in_a_fixed_basis(d_a, d_b, seed):
    """Claim 3 / Eq. 6: in fixed (not eigen-) bases ``Q_a, Q_b`` the λ-EMA converges to
    ``λ_a = diag(Q_aᵀ E[G P_b Gᵀ] Q_a)/d_b`` (and symmetrically), the minimiser of Eq. 2 over λ."""
    gen = torch.Generator().manual_seed(seed)
    n = 6
    samples = torch.randn(n, d_a, d_b, generator=gen, dtype=F64)
    samples = samples * torch.linspace(0.3, 3.0, d_b, dtype=F64)
    layout = structures.NMode(max_dim=5).plan((n + 5, d_a, d_b))  # sample mode of size > max_dim: identity
    layout = precond.Layout((n, d_a, d_b), (n, d_a, d_b), layout.kinds, pattern="d0 d1 d2 -> d0 d1 d2")
    q_a, q_b = random_orthogonal(d_a, gen), random_orthogonal(d_b, gen)
    bases_ = [None, q_a[None], q_b[None]]
    spectra = [None, torch.ones(1, d_a, dtype=F64), torch.ones(1, d_b, dtype=F64)]
    factors = [None, None, None]  # λ only: the basis stays fixed
    estimator = estimators.KL(beta=0.5, floor=0.0)
    for _ in range(300):
        estimator.update(ParamState(Q=bases_, S=factors, lam=spectra), samples.unsqueeze(0), layout)
    lam_a, lam_b = spectra[1][0], spectra[2][0]
    p_a = q_a @ torch.diag(1 / lam_a) @ q_a.T
    p_b = q_b @ torch.diag(1 / lam_b) @ q_b.T
    want_a = torch.diagonal(q_a.T @ (sum(g @ p_b @ g.T for g in samples) / n) @ q_a) / d_b
    want_b = torch.diagonal(q_b.T @ (sum(g.T @ p_a @ g for g in samples) / n) @ q_b) / d_a
    torch.testing.assert_close(lam_a, want_a, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(lam_b, want_b, rtol=1e-7, atol=1e-10)
    sigma = second_moment(samples)

    def objective(la, lb):
        return kl_objective(sigma, [q_a @ torch.diag(la) @ q_a.T, q_b @ torch.diag(lb) @ q_b.T])

    best = objective(lam_a, lam_b)
    for _ in range(5):
        ea = torch.exp(0.1 * torch.randn(d_a, generator=gen, dtype=F64))
        eb = torch.exp(0.1 * torch.randn(d_b, generator=gen, dtype=F64))
        assert objective(lam_a * ea, lam_b * eb) >= best - 1e-10


@pytest.mark.parametrize("shape", [(6, 3), (2, 5, 4)])
def test_rebalancing_the_scale_gauge_leaves_every_update_unchanged(shape):
    """``(c S_a, S_b/c)`` is the same preconditioner: with ``rebalance`` the updates are those without it, while
    the modes' mean eigenvalues are equalised."""
    gen = torch.Generator().manual_seed(11)
    grads = [torch.randn(shape, generator=gen, dtype=F64) * torch.linspace(0.1, 3, shape[-1], dtype=F64)
             for _ in range(12)]
    runs = []
    for rebalance in (False, True):
        p = torch.nn.Parameter(torch.zeros(shape, dtype=F64))
        opt = precond.Optimizer([p], lr=0.1, momentum=0.5, state_dtype=F64, preconditioner=precond.Preconditioner(
            structures.NMode(), estimators.KL(beta=0.8, floor=0.0, rebalance=rebalance), bases.QRPowerStep(every=3),
            precond.Power(p=0.5, eps=0.0)))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["estimator"]["lambda"]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-10, atol=1e-12)
    means = [lam.mean().item() for lam in runs[1][1].values()]
    assert max(means) / min(means) == pytest.approx(1.0, rel=1e-9)
    if len(shape) == 2:  # the 6x3 weight's two modes do drift apart without rebalancing
        unbalanced = [lam.mean().item() for lam in runs[0][1].values()]
        assert max(unbalanced) / min(unbalanced) > 1.01
