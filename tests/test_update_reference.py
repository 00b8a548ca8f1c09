"""Property 2 (docs/design.md): the applied update equals the dense float64 reference
``(⊗_k Q_k diag(λ_k+ε)^{-p} Q_kᵀ) vec(G)`` built with ``torch.kron``, for every structure."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import bases
import estimators
import precond

from reference import F64, kron_all
from strategies import seeds, shapes, structure_strategy


def _reference_update(direction, layout, state, applier):
    """Dense ``(⊗_k A_k) vec(M)`` from the state's ``Q_k``, ``λ_k`` (independent of the library's math)."""
    qs = {k: v[0] for k, v in state["basis"]["Q"].items()}  # batch of one
    lams = {k: v[0] for k, v in state["estimator"]["lambda"].items()}
    spectral = sum(kind != "none" for kind in layout.kinds)
    p = 1.0 / (2 * max(1, spectral)) if applier.p == "1/(2N)" else float(applier.p)
    if p == 0.0:  # documented: p = 0 is the identity applier (momentum SGD), ε plays no role
        return direction.to(F64)
    mats_q, lam_vectors = [], []
    for k, (d, kind) in enumerate(zip(layout.view_shape, layout.kinds)):
        q = qs.get(str(k))
        mats_q.append(torch.eye(d, dtype=F64) if q is None else q.to(F64))
        lam_vectors.append(torch.ones(d, dtype=F64) if kind == "none" else lams[str(k)].to(F64))
    q_full = kron_all(mats_q)
    if applier.eps_placement == "factor":
        scaled = [v if kind == "none" else (v + applier.eps) ** (-p) for v, kind in zip(lam_vectors, layout.kinds)]
        middle = kron_all([torch.diag(v) for v in scaled])
    else:
        product = kron_all([v.reshape(-1, 1) for v in lam_vectors]).reshape(-1)
        middle = torch.diag(1.0 / (product**p + applier.eps))
    vec = direction.reshape(-1).to(F64)
    return (q_full @ middle @ q_full.T @ vec).reshape(direction.shape)


@given(
    shape=shapes(),
    structure=structure_strategy(),
    estimator=st.sampled_from([estimators.KL(beta=0.9), estimators.Shampoo(beta=0.9)]),
    basis=st.sampled_from([bases.Eigh(every=2), bases.QRPowerStep(every=2, sort=True), bases.Identity()]),
    p=st.sampled_from([0.5, 0.25, "1/(2N)", 0.0]),
    placement=st.sampled_from(["factor", "outside"]),
    seed=seeds,
)
def test_applied_update_equals_dense_kron_reference(shape, structure, estimator, basis, p, placement, seed):
    gen = torch.Generator().manual_seed(seed)
    applier = precond.Power(p=p, eps=1e-3, eps_placement=placement)
    pc = precond.Preconditioner(structure=structure, estimator=estimator, basis=basis, applier=applier)
    layout = pc.plan(shape)
    grads = [layout.view(torch.randn(shape, generator=gen, dtype=F64)).unsqueeze(0) for _ in range(4)]
    state = pc.init_state(grads[0], layout)
    for step, g in enumerate(grads[1:], start=1):  # a refresh happens at step 2
        pc.absorb(state, g, layout, step)
    direction = torch.randn(shape, generator=gen, dtype=F64)
    want = layout.unview(_reference_update(layout.view(direction), layout, state.storage(), applier))
    viewed = layout.view(direction).unsqueeze(0)
    got = layout.unview(pc.precondition(state, viewed, viewed, layout, 4)[0])  # the update uses the pre-step state
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@given(shape=shapes(max_order=3), seed=seeds)
def test_optimizer_step_applies_the_dense_update(shape, seed):
    """End to end through ``Optimizer.step``: ``W_new = W − η·U`` with ``U`` the dense reference (no momentum)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64))
    applier = precond.Power(p=0.5, eps=1e-4, eps_placement="outside")
    pc = precond.Preconditioner(structures_nmode(), estimators.KL(beta=0.8), bases.QRPowerStep(every=1), applier)
    opt = precond.Optimizer([weight], preconditioner=pc, lr=0.1, momentum=0.0, state_dtype=F64)
    layout = pc.plan(shape)
    for _ in range(3):
        weight.grad = torch.randn(shape, generator=gen, dtype=F64)
        before = weight.detach().clone()
        first = not opt.state[weight]
        state_before = {
            "basis": {"Q": {k: v[None].clone() for k, v in opt.state[weight].get("basis", {"Q": {}})["Q"].items()}},
            "estimator": {"lambda": {
                k: v[None].clone() for k, v in opt.state[weight].get("estimator", {"lambda": {}})["lambda"].items()
            }},
        }
        opt.step()
        if first:
            torch.testing.assert_close(weight.detach(), before)  # first step only fills the statistics
            continue
        want = before - 0.1 * layout.unview(_reference_update(layout.view(weight.grad), layout, state_before, applier))
        torch.testing.assert_close(weight.detach(), want, rtol=1e-9, atol=1e-9)


def structures_nmode():
    import structures

    return structures.NMode()
