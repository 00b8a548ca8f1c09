"""Property 2 (docs/design.md): the applied update equals the dense float64 reference
``(⊗_k Q_k diag(λ_k+ε)^{-p} Q_kᵀ) vec(G)`` built with ``torch.kron`` (with a dense spectrum ``V``,
``(⊗_k Q_k) diag(vec V̂)^{-p} (⊗_k Q_k)ᵀ vec(G)``).

Sampled: every structure (``NMode``, ``Kronecker``, ``OneSided``, ``Diagonal``, ``Matrix``, ``LayerMatrix``), every
estimator of the registry (``tests/registry.py``) that ``Power`` applies to — ``KL``, ``Shampoo``, ``Frobenius``
factored and dense (bias-corrected), ``DenseSpectrum`` over ``KL`` — every basis (``Eigh``, ``QRPowerStep``,
``CholeskyQR``, ``Identity``), exponents ``½``, ``¼``, ``"1/(2N)"``, ``0`` and both ε placements; every
estimator × basis pair, and every structure with a Kronecker and a dense spectrum, also runs once on a fixed
3-mode shape, so none depends on the draw. Not here: ``KFAC`` and
``EKFAC`` (their statistics come from module hooks: ``tests/test_kfac.py`` checks the dense damped solve),
``Stateless`` (no spectrum; ``NewtonSchulz``: ``tests/test_muon.py``) and blocked parameters (per-block references,
``tests/test_blocking.py``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures

from reference import F64, kron_all
from strategies import seeds, shapes, structure_strategy

ESTIMATORS = {
    "KL": lambda: estimators.KL(beta=0.9),
    "Shampoo": lambda: estimators.Shampoo(beta=0.9),
    "Frobenius-factored": lambda: estimators.Frobenius(beta=0.9, spectrum="factored"),
    "Frobenius-dense": lambda: estimators.Frobenius(beta=0.9, spectrum="dense"),
    "DenseSpectrum-KL": lambda: estimators.DenseSpectrum(estimators.KL(beta=0.9), beta=0.8, bias_correction=False),
}
BASES = {
    "Eigh": lambda: bases.Eigh(every=2),
    "QRPowerStep": lambda: bases.QRPowerStep(every=2, sort=True),
    "CholeskyQR": lambda: bases.CholeskyQR(every=2),
    "Identity": lambda: bases.Identity(),
}
STEP = 4
"""The step whose update is checked (after the fill and 3 folds; a refresh happens at step 2)."""


def _exponent(applier, layout):
    """``p``; ``"1/(2N)"`` with ``N`` the modes that have a spectrum, a dense ``V`` standing for ``⊗_k λ_k``."""
    if applier.p != "1/(2N)":
        return float(applier.p)
    spectral = sum(kind != "none" for kind in layout.kinds)
    return 1.0 / (2 * max(1, spectral))


def _reference_update(direction, layout, state, applier, estimator=None, step=STEP):
    """Dense ``(⊗_k A_k) vec(M)`` from the state's ``Q_k``, ``λ_k`` or ``V`` (independent of the library's math)."""
    qs = {k: v[0] for k, v in state["basis"]["Q"].items()}  # batch of one
    dense = state["estimator"].get("V") if isinstance(estimator, estimators.DenseSpectrum) else None
    p = _exponent(applier, layout)
    if p == 0.0:  # documented: p = 0 is the identity applier (momentum SGD), ε plays no role
        return direction.to(F64)
    mats_q = []
    for k, d in enumerate(layout.view_shape):
        q = qs.get(str(k))
        mats_q.append(torch.eye(d, dtype=F64) if q is None else q.to(F64))
    q_full = kron_all(mats_q)
    vec = direction.reshape(-1).to(F64)
    if dense is not None:  # V̂ = V/(1−βᵗ) with bias correction; R ⊙ (V̂+ε)^{-p} or R / (V̂^p + ε)
        v = dense[0].to(F64).reshape(-1)
        if estimator.bias_correction:
            v = v / (1 - estimator.beta**step)
        scale = (v + applier.eps) ** (-p) if applier.eps_placement == "factor" else 1.0 / (v**p + applier.eps)
        return (q_full @ torch.diag(scale) @ q_full.T @ vec).reshape(direction.shape)
    lams = {k: v[0] for k, v in state["estimator"]["lambda"].items()}
    lam_vectors = [torch.ones(d, dtype=F64) if kind == "none" else lams[str(k)].to(F64)
                   for k, (d, kind) in enumerate(zip(layout.view_shape, layout.kinds, strict=True))]
    if applier.eps_placement == "factor":
        scaled = [v if kind == "none" else (v + applier.eps) ** (-p)
                  for v, kind in zip(lam_vectors, layout.kinds, strict=True)]
        middle = kron_all([torch.diag(v) for v in scaled])
    else:
        product = kron_all([v.reshape(-1, 1) for v in lam_vectors]).reshape(-1)
        middle = torch.diag(1.0 / (product**p + applier.eps))
    return (q_full @ middle @ q_full.T @ vec).reshape(direction.shape)


def _check_applied_update(shape, structure, estimator, basis, p, placement, seed):
    gen = torch.Generator().manual_seed(seed)
    applier = precond.Power(p=p, eps=1e-3, eps_placement=placement)
    pc = precond.Preconditioner(structure=structure, estimator=estimator, basis=basis, applier=applier)
    layout = pc.plan(shape)
    grads = [layout.view(torch.randn(shape, generator=gen, dtype=F64)).unsqueeze(0) for _ in range(STEP)]
    state = pc.init_state(grads[0], layout)
    for step, g in enumerate(grads[1:], start=1):  # a refresh happens at step 2
        pc.absorb(state, g, layout, step)
    direction = torch.randn(shape, generator=gen, dtype=F64)
    viewed = layout.view(direction).unsqueeze(0)
    before = {"basis": {"Q": {k: v.clone() for k, v in state.storage()["basis"]["Q"].items()}},
              "estimator": {"lambda": {k: v.clone() for k, v in state.storage()["estimator"]["lambda"].items()}}}
    # the update uses the pre-step bases and λ; a dense V first folds this step's R⊙R (SOAP's order), so it is
    # read afterwards (the apply never refreshes a basis)
    got = layout.unview(pc.precondition(state, viewed, viewed, layout, STEP)[0])
    if "V" in state.storage()["estimator"]:
        before["estimator"]["V"] = state.storage()["estimator"]["V"]
    want = layout.unview(_reference_update(layout.view(direction), layout, before, applier, estimator))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@st.composite
def any_structure(draw, shape):
    """``tests/strategies.py``'s structures, plus ``LayerMatrix`` and (for weights of two or more axes) ``Matrix``."""
    options = [structure_strategy(), st.builds(structures.LayerMatrix, max_dim=st.one_of(st.none(), st.integers(2, 5)))]
    if len(shape) >= 2:
        options.append(st.just(structures.Matrix()))
    return draw(st.one_of(*options))


@given(
    data=st.data(),
    shape=shapes(),
    estimator=st.sampled_from(sorted(ESTIMATORS)),
    basis=st.sampled_from(sorted(BASES)),
    p=st.sampled_from([0.5, 0.25, "1/(2N)", 0.0]),
    placement=st.sampled_from(["factor", "outside"]),
    seed=seeds,
)
def test_applied_update_equals_dense_kron_reference(data, shape, estimator, basis, p, placement, seed):
    structure = data.draw(any_structure(shape))
    _check_applied_update(shape, structure, ESTIMATORS[estimator](), BASES[basis](), p, placement, seed)


@pytest.mark.parametrize("basis", sorted(BASES))
@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_and_basis_applies_the_dense_reference(estimator, basis):
    """Each pair once, on a 3-mode tensor with every mode dense, ``p = ¼`` and ε in the factor, so that no pair's
    coverage depends on the draw above."""
    _check_applied_update((3, 4, 2), structures.NMode(), ESTIMATORS[estimator](), BASES[basis](), 0.25, "factor", 7)


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
    return structures.NMode()


STRUCTURES = {
    "NMode": lambda: structures.NMode(max_dim=3, large="diagonal"),
    "Kronecker": lambda: structures.Kronecker(max_dim=8),
    "OneSided": lambda: structures.OneSided(),
    "Diagonal": lambda: structures.Diagonal(),
    "Matrix": lambda: structures.Matrix(),
    "LayerMatrix": lambda: structures.LayerMatrix(max_dim=3),
}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize("estimator", ["Shampoo", "Frobenius-dense"])
def test_every_structure_applies_the_dense_reference(structure, estimator):
    """Each structure once with a Kronecker and a dense spectrum (``CholeskyQR`` bases, ``p = ½``, ε outside)."""
    _check_applied_update((3, 4, 2), STRUCTURES[structure](), ESTIMATORS[estimator](), BASES["CholeskyQR"](), 0.5,
                          "outside", 11)
