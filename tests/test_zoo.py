"""docs/design.md property 5 (reductions to Adam, AdamW and momentum SGD; rotation equivariance of the exact-basis
family), grafting against a hand-written reference, and large modes (embeddings, LM heads)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from estimators.dense import permute_mode
from precond.state import ParamState

from reference import F64, random_orthogonal
from strategies import seeds, shapes


def _adam_like(params, lr, betas, eps, weight_decay, structure):
    return precond.Optimizer(
        params, lr=lr, momentum=betas[0], weight_decay=weight_decay, bias_correction=True, state_dtype=F64,
        preconditioner=precond.Preconditioner(
            structure=structure, estimator=estimators.Frobenius(beta=betas[1], spectrum="dense"),
            basis=bases.Identity(), applier=precond.Power(p=0.5, eps=eps, eps_placement="outside"),
            first_step="update"))


@given(shape=shapes(max_numel=120), seed=seeds, weight_decay=st.sampled_from([0.0, 0.1]),
       structure=st.sampled_from([structures.NMode(), structures.Kronecker(), structures.Diagonal()]))
def test_identity_basis_dense_frobenius_is_adam_and_adamw(shape, seed, weight_decay, structure):
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(shape, generator=gen, dtype=F64)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    opt = _adam_like([ours], structure=structure, **kw)
    ref = (torch.optim.AdamW if weight_decay else torch.optim.Adam)([theirs], foreach=False, **kw)
    for _ in range(6):
        grad = torch.randn(shape, generator=gen, dtype=F64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)


@given(shape=shapes(max_numel=120), seed=seeds, momentum=st.sampled_from([0.0, 0.9]),
       basis=st.sampled_from([bases.Eigh(every=1), bases.QRPowerStep(every=2), bases.Identity()]))
def test_power_zero_is_momentum_sgd(shape, seed, momentum, basis):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    expected, m = weight.detach().clone(), torch.zeros(shape, dtype=F64)
    opt = precond.Optimizer(
        [weight], lr=0.05, momentum=momentum, state_dtype=F64, preconditioner=precond.Preconditioner(
            structures.NMode(), estimators.KL(), basis, precond.Power(p=0.0), first_step="update"))
    for _ in range(5):
        grad = torch.randn(shape, generator=gen, dtype=F64)
        weight.grad = grad
        opt.step()
        m = momentum * m + (1 - momentum) * grad if momentum else grad
        expected = expected - 0.05 * m
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-12)


def _rotate_modes(x, rotations):
    for k, u in enumerate(rotations):
        x = torch.movedim(torch.tensordot(u, torch.movedim(x, k, 0), dims=1), 0, k)
    return x


EXACT_BASIS_FAMILY = {
    "shampoo": (estimators.Shampoo(beta=0.9), precond.Power(p=0.5, eps=1e-6)),
    "shampoo_original": (estimators.Shampoo(beta=1.0), precond.Power(p="1/(2N)", eps=1e-6)),
    "idealized_kl": (estimators.KL(beta=0.9, init_lambda=None, damping=1e-3, floor=0.0, refresh_spectrum="reset"),
                     precond.Power(p=0.5, eps=1e-6, eps_placement="outside")),
    "eigenvalue_corrected": (estimators.Frobenius(beta=0.9, spectrum="dense", transport="keep"),
                             precond.Power(p=0.5, eps=1e-6, eps_placement="outside")),
}


@settings(max_examples=12)
@given(dims=st.lists(st.integers(2, 5), min_size=2, max_size=3), seed=seeds,
       family=st.sampled_from(sorted(EXACT_BASIS_FAMILY)))
def test_exact_basis_updates_are_rotation_equivariant(dims, seed, family):
    """Rotating every mode of the gradients by ``U_k`` rotates the updates by the same ``U_k``.

    Needs a unique eigenbasis from the first gradient on, so every ``d_k ≤ D_{-k}`` (full-rank grams); with a
    degenerate eigenspace the basis inside it is arbitrary and a dense ``V`` is not equivariant."""
    assume(all(d * d <= math.prod(dims) for d in dims))
    gen = torch.Generator().manual_seed(seed)
    rotations = [random_orthogonal(d, gen) for d in dims]
    estimator, applier = EXACT_BASIS_FAMILY[family]
    pc = precond.Preconditioner(structures.NMode(), estimator, bases.Eigh(every=1), applier, first_step="update")
    plain, rotated = [torch.nn.Parameter(torch.zeros(dims, dtype=F64)) for _ in range(2)]
    opts = [precond.Optimizer([w], preconditioner=pc, lr=1.0, momentum=0.5, state_dtype=F64) for w in (plain, rotated)]
    for _ in range(4):
        grad = torch.randn(dims, generator=gen, dtype=F64)
        plain.grad, rotated.grad = grad, _rotate_modes(grad, rotations)
        for opt in opts:
            opt.step()
        torch.testing.assert_close(rotated.detach(), _rotate_modes(plain.detach(), rotations), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("onto", ["adam", "rmsprop", "sgd"])
def test_graft_takes_the_norm_of_the_graft_direction(onto):
    gen = torch.Generator().manual_seed(0)
    shape, lr, beta1, beta_graft, eps = (4, 3, 2), 0.1, 0.9, 0.99, 1e-8
    weight = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    inner = precond.Power(p=0.5, eps=1e-6)
    pc = precond.Preconditioner(structures.NMode(), estimators.Shampoo(), bases.Eigh(every=2),
                                precond.Graft(inner, onto=onto, beta=beta_graft, eps=eps), first_step="update")
    opt = precond.Optimizer([weight], preconditioner=pc, lr=lr, momentum=beta1, state_dtype=F64)
    m, v = torch.zeros(shape, dtype=F64), torch.zeros(shape, dtype=F64)
    for t in range(1, 6):
        grad = torch.randn(shape, generator=gen, dtype=F64)
        weight.grad = grad
        before = weight.detach().clone()
        opt.step()
        m = beta1 * m + (1 - beta1) * grad
        v = beta_graft * v + (1 - beta_graft) * grad**2
        if onto == "sgd":
            graft = m
        else:
            v_hat = v / (1 - beta_graft**t) if onto == "adam" else v
            graft = m / (v_hat.sqrt() + eps)
        step = (before - weight.detach()) / lr
        torch.testing.assert_close(step.norm(), graft.norm(), rtol=1e-10, atol=0)


def test_graft_keeps_the_inner_direction():
    """Grafting rescales, never rotates: the grafted step is parallel to the ungrafted one."""
    gen = torch.Generator().manual_seed(1)
    shape = (5, 4)
    weights = [torch.nn.Parameter(torch.zeros(shape, dtype=F64)) for _ in range(2)]
    inner = precond.Power(p=0.5, eps=1e-6)
    opts = [precond.Optimizer([w], lr=1.0, momentum=0.0, state_dtype=F64, preconditioner=precond.Preconditioner(
        structures.NMode(), estimators.Shampoo(), bases.Eigh(every=1), applier, first_step="update"))
        for w, applier in zip(weights, (inner, precond.Graft(inner)), strict=True)]
    for _ in range(3):
        grad = torch.randn(shape, generator=gen, dtype=F64)
        before = [w.detach().clone() for w in weights]
        for w, opt in zip(weights, opts, strict=True):
            w.grad = grad.clone()
            opt.step()
        a, b = [(w0 - w.detach()).reshape(-1) for w0, w in zip(before, weights, strict=True)]
        torch.testing.assert_close(torch.dot(a, b).abs(), a.norm() * b.norm(), rtol=1e-10, atol=0)


@given(shape=shapes(min_order=1, max_order=4), seed=seeds)
def test_dense_spectrum_permutation_moves_entries_with_their_column(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *shape, generator=gen, dtype=F64)
    for k, d in enumerate(shape):
        perm = torch.stack([torch.randperm(d, generator=gen) for _ in range(2)])
        got = permute_mode(x, k, perm)
        for b in range(2):
            want = torch.index_select(x[b], k, perm[b])
            assert torch.equal(got[b], want)


def test_soap_permutes_v_with_a_sorted_refresh():
    """With ``sort=True`` the dense ``V`` follows its basis column: after a refresh that only permutes the basis
    (an exact eigenbasis listed in the wrong order), ``V`` is permuted the same way."""
    s = torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=F64)).unsqueeze(0)
    q_old = torch.eye(3, dtype=F64).unsqueeze(0)
    refresh = bases.QRPowerStep(sort=True).refresh(s, q_old)
    v = torch.tensor([[10.0, 30.0, 20.0]], dtype=F64).unsqueeze(-1).expand(1, 3, 2).clone()
    estimator = estimators.Frobenius(spectrum="dense")
    layout = structures.NMode().plan((3, 2))
    ps = ParamState(Q=[q_old.clone(), None], S=[s.clone(), None],
                    lam=[torch.ones(1, 3, dtype=F64), torch.ones(1, 2, dtype=F64)], estimator={"V": v})
    estimator.on_refresh(ps, 0, refresh, layout)
    assert torch.equal(v[0, :, 0], torch.tensor([30.0, 20.0, 10.0], dtype=F64))
    assert torch.equal(refresh.basis[0].abs(), torch.eye(3, dtype=F64)[:, [1, 2, 0]])


def test_embedding_and_lm_head_with_one_very_large_mode():
    torch.manual_seed(0)
    vocab, width = 3000, 8
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab))
    opt = precond.kl_shampoo(model.named_parameters(), lr=3e-3, max_dim=64, every=3)
    text = opt.describe()
    assert "3000:-" in text and "8:dense" in text
    tokens = torch.randint(0, vocab, (64,))
    targets = (tokens * 7 + 1) % vocab
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[1]
