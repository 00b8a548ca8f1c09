"""One estimator step against dense float64 math (Eq. 4/5, the N-mode extension, Claim 3's λ rule)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import estimators
import structures
from precond.state import ParamState

from reference import F64, kron_all, mode_matrix, random_orthogonal, random_spd, unfold
from strategies import seeds, shapes


def _random_state(layout, gen, with_bases=True):
    bases, spectra, factors = [], [], []
    for d, kind in zip(layout.view_shape, layout.kinds, strict=True):
        dense = kind == "dense"
        bases.append(random_orthogonal(d, gen).unsqueeze(0) if dense and with_bases else None)
        spectra.append(None if kind == "none" else (0.2 + torch.rand(1, d, generator=gen, dtype=F64)))
        factors.append(random_spd(d, gen).unsqueeze(0) if dense else None)
    return bases, spectra, factors


def _clone(items):
    return [None if t is None else t.clone() for t in items]


def _inverse_factor(kind, q, lam, d):
    return mode_matrix(kind, None if q is None else q[0], None if lam is None else 1.0 / lam[0], d)


@given(shape=shapes(), seed=seeds, beta=st.sampled_from([0.0, 0.5, 0.95]), damping=st.sampled_from([0.0, 1e-2]),
       max_dim=st.one_of(st.none(), st.integers(2, 4)), large=st.sampled_from(["none", "diagonal"]))
def test_kl_step_matches_dense_reference(shape, seed, beta, damping, max_dim, large):
    gen = torch.Generator().manual_seed(seed)
    layout = structures.NMode(max_dim=max_dim, large=large).plan(shape)
    grad = torch.randn(layout.view_shape, generator=gen, dtype=F64)
    bases, spectra, factors = _random_state(layout, gen)
    old_spectra, old_factors = _clone(spectra), _clone(factors)
    estimator = estimators.KL(beta=beta, damping=damping, floor=0.0)
    estimator.update(ParamState(Q=bases, S=factors, lam=spectra), grad.unsqueeze(0), layout)

    dims, kinds = layout.view_shape, layout.kinds
    inverses = [_inverse_factor(kind, q, lam, d)
                for kind, q, lam, d in zip(kinds, bases, old_spectra, dims, strict=True)]
    for k, kind in enumerate(kinds):
        if kind == "none":
            assert spectra[k] is None
            continue
        others = [inverses[j] for j in range(len(dims)) if j != k]
        complement = grad.numel() // dims[k]
        unfolded = unfold(grad, k)
        delta = unfolded @ (kron_all(others) if others else torch.ones(1, 1, dtype=F64)) @ unfolded.T / complement
        if damping:  # E[ggᵀ] + κI projected on mode k: κ ∏_{j≠k} tr(P_j)/d_j
            shift = (
                damping * torch.prod(torch.stack([torch.trace(m) / m.shape[0] for m in others])) if others else damping
            )
            delta = delta + shift * torch.eye(dims[k], dtype=F64)
        q = bases[k][0] if bases[k] is not None else torch.eye(dims[k], dtype=F64)
        want_lambda = beta * old_spectra[k][0] + (1 - beta) * torch.diagonal(q.T @ delta @ q)
        torch.testing.assert_close(spectra[k][0], want_lambda, rtol=1e-10, atol=1e-12)
        if kind == "dense":
            torch.testing.assert_close(
                factors[k][0], beta * old_factors[k][0] + (1 - beta) * delta, rtol=1e-10, atol=1e-12
            )


@given(shape=shapes(), seed=seeds, beta=st.sampled_from([0.0, 0.9, 1.0]))
def test_shampoo_step_matches_dense_reference(shape, seed, beta):
    gen = torch.Generator().manual_seed(seed)
    layout = structures.NMode(max_dim=4, large="diagonal").plan(shape)
    grad = torch.randn(layout.view_shape, generator=gen, dtype=F64)
    bases, spectra, factors = _random_state(layout, gen)
    old_spectra, old_factors = _clone(spectra), _clone(factors)
    estimators.Shampoo(beta=beta).update(ParamState(Q=bases, S=factors, lam=spectra), grad.unsqueeze(0), layout)
    for k, kind in enumerate(layout.kinds):
        g = unfold(grad, k)
        gram = g @ g.T

        def new(old: torch.Tensor, gram: torch.Tensor = gram) -> torch.Tensor:
            return old + gram if beta == 1.0 else beta * old + (1 - beta) * gram

        if kind == "dense":
            torch.testing.assert_close(factors[k][0], new(old_factors[k][0]), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(spectra[k], old_spectra[k])  # "refresh" spectrum: stale until a refresh
        elif kind == "diagonal":
            torch.testing.assert_close(
                spectra[k][0], torch.diagonal(new(torch.diag(old_spectra[k][0]))), rtol=1e-10, atol=1e-12
            )


@given(shape=shapes(min_order=2, max_order=3), seed=seeds)
def test_zero_gradient_leaves_statistics_alone(shape, seed):
    """docs/design.md: skip statistic updates for an all-zero gradient (λ must not decay to the floor)."""
    gen = torch.Generator().manual_seed(seed)
    layout = structures.NMode().plan(shape)
    for estimator in (estimators.KL(beta=0.9), estimators.Shampoo(beta=0.9)):
        bases, spectra, factors = _random_state(layout, gen)
        old_spectra, old_factors = _clone(spectra), _clone(factors)
        estimator.update(
            ParamState(Q=bases, S=factors, lam=spectra), torch.zeros(1, *layout.view_shape, dtype=F64), layout
        )
        for new, old in zip(spectra + factors, old_spectra + old_factors, strict=True):
            if old is not None:
                assert torch.equal(new, old)


def test_kl_floor_is_the_prototype_clamp():
    """``λ_k ≥ max(10, min(d_k, 4000))^{-2}`` after an update (the prototype's ``λ^{-1/2} ≤ c_k``)."""
    layout = structures.NMode().plan((3, 20))
    bases = [torch.eye(3, dtype=F64)[None], torch.eye(20, dtype=F64)[None]]
    spectra = [torch.full((1, 3), 1e-9, dtype=F64), torch.full((1, 20), 1e-9, dtype=F64)]
    factors = [torch.eye(3, dtype=F64)[None], torch.eye(20, dtype=F64)[None]]
    grad = torch.zeros(1, 3, 20, dtype=F64)
    grad[0, 0, 0] = 1e-6
    estimators.KL(beta=0.5).update(ParamState(Q=bases, S=factors, lam=spectra), grad, layout)
    assert spectra[0].min().item() >= 10.0**-2 - 1e-15  # d = 3 -> c = 10
    assert spectra[1].min().item() >= 20.0**-2 - 1e-15  # d = 20 -> c = 20
