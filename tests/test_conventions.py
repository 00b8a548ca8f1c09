"""Reference conventions (``docs/conventions.md``): each option against the formula it implements, in float64.

Every reference below is dense math on small shapes (unfoldings, Kronecker products, ``eigh`` matrix functions),
written from the formulas of Meta's Distributed Shampoo, the official SOAP and the KL authors' prototype — never from
the library's own code. Each option is off by default; a default-is-unchanged check sits next to each, and the
recorded trajectories (``tests/test_trajectories.py``) cover the presets.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from precond import Graft, Normalize, Optimizer, Power, Preconditioner
from precond.parts import ApplyContext
from precond.state import ParamState

from reference import F64, kron_all, mode_matrix, random_orthogonal, random_spd, unfold
from strategies import seeds, shapes


# --- independent helpers -------------------------------------------------------------------------------------
def matrix_power(s: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """``(S + εI)^{-p}`` with negative round-off eigenvalues clipped at 0 (a basis-free matrix function)."""
    w, v = torch.linalg.eigh(s.to(F64))
    return v @ torch.diag((w.clamp_min(0) + eps).pow(-p)) @ v.T


def kron_apply(mats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(⊗_k A_k) vec(X)`` reshaped like ``X`` (row-major ``vec``)."""
    return (kron_all(mats) @ x.reshape(-1)).reshape(x.shape)


def grams(g: torch.Tensor) -> list[torch.Tensor]:
    return [unfold(g, k) @ unfold(g, k).T for k in range(g.ndim)]


def norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


# --- Preconditioner(order=...) -------------------------------------------------------------------------------
def _shampoo_reference(grads, beta, every, p, eps, first_step, order):
    """Updates of Shampoo(β)·Eigh(every)·Power(p, ε) on one dense tensor, from the formulas: ``S_k`` EMA of the
    grams (fill ``(1−β) Gram_k(G_1)``), roots ``(S_k + εI)^{-p}`` recomputed after the fold of steps ``t ≡ 0 mod
    every`` (and from the fill), applied before (``apply_then_fold``) or after (``fold_then_apply``) the fold.
    A size-1 mode (only a one-entry tensor has one after the view) is identity."""
    identity = grads[0].numel() == 1
    factors = [(1 - beta) * gram for gram in grams(grads[0])]
    roots = [matrix_power(s, p, eps) for s in factors]
    updates = []
    stream = grads if first_step == "update" else grads[1:]
    for t, g in enumerate(stream, start=1):
        folds = not (t == 1 and first_step == "update")
        if order == "apply_then_fold":
            updates.append(kron_apply(roots, g))
        if folds:
            factors = [beta * s + (1 - beta) * gram for s, gram in zip(factors, grams(g), strict=True)]
            if t % every == 0:
                roots = [matrix_power(s, p, eps) for s in factors]
        if order == "fold_then_apply":
            updates.append(kron_apply(roots, g))
    return list(stream) if identity else updates


@given(shape=shapes(min_order=1, max_order=3, max_dim=4, max_numel=40), seed=seeds,
       every=st.sampled_from([1, 2, 3]), first_step=st.sampled_from(["fill", "update"]),
       order=st.sampled_from(["apply_then_fold", "fold_then_apply"]))
def test_order_matches_the_dense_step_sequence(shape, seed, every, first_step, order):
    """``order="fold_then_apply"`` (Meta): ``G_t`` is folded and due roots refreshed before ``G_t`` is
    preconditioned; the default preconditions with the pre-step roots. Both against the dense sequence."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(6)]
    beta, p, eps = 0.7, 0.25, 1e-3
    pc = Preconditioner(structures.NMode(vectors="dense"), estimators.Shampoo(beta=beta), bases.Eigh(every=every),
                        Power(p=p, eps=eps), first_step=first_step, order=order)
    layout = pc.plan(shape)

    def view(g):
        return layout.view(g).unsqueeze(0)

    ps = pc.init_state(view(grads[0]), layout)
    stream = grads if first_step == "update" else grads[1:]
    want = _shampoo_reference([g.reshape(layout.view_shape) for g in grads], beta, every, p, eps, first_step, order)
    for t, (g, expected) in enumerate(zip(stream, want, strict=True), start=1):
        got = pc.step(ps, view(g), view(g), layout, t)[0]
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_default_order_is_apply_then_fold():
    pc = Preconditioner(structures.NMode(), estimators.Shampoo(), bases.Eigh(), Power())
    assert pc.order == "apply_then_fold" and not pc.folds_before_apply
    with pytest.raises(ValueError, match="order"):
        Preconditioner(structures.NMode(), estimators.Shampoo(), bases.Eigh(), Power(), order="meta")


# --- Meta-style Shampoo: graft warm-up, factor bias correction, fold-then-apply, first step used ------------------
META = {"beta1": 0.9, "beta2": 0.95, "graft_beta": 0.99, "graft_eps": 1e-10, "eps": 1e-6, "p": 0.25, "lr": 0.05,
        "wd": 0.01}


def _meta_reference(w0, grads, every, start, c=META):
    """Meta's Distributed Shampoo step, from its formulas (one dense parameter, decoupled weight decay first):
    fold ``S_k ← β₂S_k + (1−β₂)Gram_k(G_t)``; roots ``(S_k/(1−β₂ᵗ) + εI)^{-p}`` at ``t = start`` and at ``t ≡ 0 mod
    every, t > start``; Adam graft ``m̂/(√v̂ + ε_g)``; before ``start`` the graft direction alone, after it the
    Shampoo direction ``⊗_k root_k · m̂`` rescaled to the graft's norm; ``W ← W(1−η·wd) − ηU``."""
    w = w0.clone()
    factors = [torch.zeros(d, d, dtype=F64) for d in w.shape]
    roots = [torch.eye(d, dtype=F64) for d in w.shape]
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        factors = [c["beta2"] * s + (1 - c["beta2"]) * gram for s, gram in zip(factors, grams(g), strict=True)]
        if t == start or (t % every == 0 and t > start):
            roots = [matrix_power(s / (1 - c["beta2"] ** t), c["p"], c["eps"]) for s in factors]
        v = c["graft_beta"] * v + (1 - c["graft_beta"]) * g * g
        m = c["beta1"] * m + (1 - c["beta1"]) * g
        m_hat = m / (1 - c["beta1"] ** t)
        graft = m_hat / ((v / (1 - c["graft_beta"] ** t)).sqrt() + c["graft_eps"])
        if t < start:
            u = graft
        else:
            shampoo = kron_apply(roots, m_hat)
            u = shampoo * norm(graft) / (norm(shampoo) + 1e-16)
        w = w * (1 - c["lr"] * c["wd"]) - c["lr"] * u
        out.append(w.clone())
    return out


def _meta_preconditioner(every, start, c=META):
    return Preconditioner(
        structure=structures.NMode(vectors="dense"),
        estimator=estimators.Shampoo(beta=c["beta2"], bias_correction=True),
        basis=bases.Eigh(every=every),
        applier=Graft(Power(p=c["p"], eps=c["eps"]), onto="adam", beta=c["graft_beta"], eps=c["graft_eps"],
                      start_preconditioning_step=start),
        first_step="update", order="fold_then_apply")


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4)])
@pytest.mark.parametrize("every,start", [(3, 3), (2, 1), (1, 1), (3, 6)])
def test_meta_shampoo_step_sequence(shape, every, start):
    """The Preconditioner's own step (``Preconditioner.step``: fold, due refreshes, apply) with the optimizer's
    momentum and decay written out, against Meta's formulas; ``start`` a multiple of ``every`` or 1 (the starts for
    which Meta's root schedule and precond's coincide, ``docs/conventions.md``)."""
    c = META
    gen = torch.Generator().manual_seed(sum(shape) + 10 * every + start)
    grads = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(8)]
    w0 = torch.randn(shape, generator=gen, dtype=F64)
    pc = _meta_preconditioner(every, start)
    layout = pc.plan(shape)
    ps = pc.init_state(grads[0].unsqueeze(0), layout)
    w, m = w0.clone(), torch.zeros_like(w0)
    for t, (g, expected) in enumerate(zip(grads, _meta_reference(w0, grads, every, start), strict=True), start=1):
        m = c["beta1"] * m + (1 - c["beta1"]) * g
        u = pc.step(ps, g.unsqueeze(0), (m / (1 - c["beta1"] ** t)).unsqueeze(0), layout, t)[0]
        w = w * (1 - c["lr"] * c["wd"]) - c["lr"] * u
        torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("every,start", [(3, 3), (2, 1)])
def test_meta_shampoo_through_the_optimizer(every, start):
    c = META
    gen = torch.Generator().manual_seed(7)
    shape = (4, 3)
    grads = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(8)]
    w0 = torch.randn(shape, generator=gen, dtype=F64)
    param = torch.nn.Parameter(w0.clone())
    opt = Optimizer([param], _meta_preconditioner(every, start), lr=c["lr"], momentum=c["beta1"],
                    bias_correction=True, weight_decay=c["wd"], decay_order="before", state_dtype=F64)
    for g, expected in zip(grads, _meta_reference(w0, grads, every, start), strict=True):
        param.grad = g.clone()
        opt.step()
        torch.testing.assert_close(param.detach(), expected, rtol=1e-9, atol=1e-11)


def _graft_context(direction, grad, v, step):
    layout = structures.NMode().plan(direction.shape[1:])
    ps = ParamState(Q=[torch.eye(d, dtype=F64).unsqueeze(0) for d in layout.view_shape],
                    S=[None] * layout.order,
                    lam=[0.5 + torch.arange(d, dtype=F64).unsqueeze(0) for d in layout.view_shape],
                    applier={"v": v})
    return ApplyContext(ps=ps, layout=layout, grad=grad, step=step)


@pytest.mark.parametrize("onto", ["adam", "rmsprop", "sgd"])
def test_graft_warm_up_gives_the_graft_direction_alone(onto):
    """``t < start_preconditioning_step``: ``U = M/(√v̂ + ε)`` (Adam) / ``M/(√v + ε)`` / ``M``; ``v`` folds every
    step; from the start on, the inner direction rescaled to the graft's norm."""
    gen = torch.Generator().manual_seed(3)
    beta, eps, start = 0.9, 1e-10, 3
    graft = Graft(Power(p=0.5, eps=0.0), onto=onto, beta=beta, eps=eps, start_preconditioning_step=start)
    v = torch.zeros(1, 3, 4, dtype=F64)
    v_ref = torch.zeros(3, 4, dtype=F64)
    lam = [0.5 + torch.arange(3, dtype=F64), 0.5 + torch.arange(4, dtype=F64)]
    for t in range(1, 6):
        g = torch.randn(3, 4, generator=gen, dtype=F64)
        direction = torch.randn(3, 4, generator=gen, dtype=F64)
        got = graft.apply(direction.unsqueeze(0), _graft_context(direction.unsqueeze(0), g.unsqueeze(0), v, t))[0]
        v_ref = beta * v_ref + (1 - beta) * g * g
        if onto == "sgd":
            graft_direction = direction
        else:
            v_hat = v_ref / (1 - beta**t) if onto == "adam" else v_ref
            graft_direction = direction / (v_hat.sqrt() + eps)
        if t < start:
            want = graft_direction
        else:
            inner = kron_apply([torch.diag(x.pow(-0.5)) for x in lam], direction)
            want = inner * norm(graft_direction) / (norm(inner) + 1e-16)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        if onto != "sgd":
            torch.testing.assert_close(v[0], v_ref, rtol=1e-12, atol=1e-15)


def test_graft_warm_up_default_and_validation():
    assert Graft(Power()).start_preconditioning_step == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="start_preconditioning_step"):
            Graft(Power(), start_preconditioning_step=bad)


@given(shape=shapes(min_order=1, max_order=3, max_dim=4, max_numel=40), seed=seeds,
       beta=st.sampled_from([0.5, 0.9, 0.999]), spectrum=st.sampled_from(["refresh", "every_step"]),
       max_dim=st.sampled_from([None, 2]))
def test_shampoo_factor_bias_correction(shape, seed, beta, spectrum, max_dim):
    """``Shampoo(bias_correction=True)``: stored factor ``S_n/(1−βⁿ)`` after ``n`` nonzero folds (an all-zero
    gradient is skipped and not counted), its eigenvalues after a refresh, ``diag(QᵀŜQ)`` every step, and a
    diagonal mode's ``λ`` = the EMA of the squares divided by ``1−βⁿ``."""
    gen = torch.Generator().manual_seed(seed)
    pc = Preconditioner(structures.NMode(max_dim=max_dim, large="diagonal", vectors="dense"),
                        estimators.Shampoo(beta=beta, spectrum=spectrum, bias_correction=True), bases.Eigh(every=2),
                        Power(p=0.5, eps=0.0))
    layout = pc.plan(shape)
    dims = layout.view_shape
    grads = [torch.randn(dims, generator=gen, dtype=F64) for _ in range(5)]
    grads[2] = torch.zeros(dims, dtype=F64)
    ps = pc.init_state(grads[0].unsqueeze(0), layout)
    raw = [(1 - beta) * gram for gram in grams(grads[0])]
    n = 1
    for t, g in enumerate(grads[1:], start=1):
        pc.absorb(ps, g.unsqueeze(0), layout, t)
        if g.abs().max() > 0:
            raw = [beta * s + (1 - beta) * gram for s, gram in zip(raw, grams(g), strict=True)]
            n += 1
        corrected = [s / (1 - beta**n) for s in raw]
        assert int(ps.estimator["count"].item()) == n
        for k, kind in enumerate(layout.kinds):
            if kind == "dense":
                torch.testing.assert_close(ps.S[k][0], corrected[k], rtol=1e-10, atol=1e-12)
                q = ps.Q[k][0]
                if spectrum == "every_step":
                    torch.testing.assert_close(ps.lam[k][0], torch.diagonal(q.T @ corrected[k] @ q).clamp_min(0),
                                               rtol=1e-9, atol=1e-11)
                elif t % 2 == 0:
                    want = torch.linalg.eigvalsh(corrected[k]).flip(-1).clamp_min(0)
                    torch.testing.assert_close(ps.lam[k][0], want, rtol=1e-9, atol=1e-11)
            elif kind == "diagonal":
                torch.testing.assert_close(ps.lam[k][0], torch.diagonal(corrected[k]), rtol=1e-10, atol=1e-12)


def test_shampoo_bias_correction_is_off_by_default_and_inert_for_a_sum():
    assert estimators.Shampoo().bias_correction is False
    layout = structures.NMode().plan((3, 4))
    g = torch.randn(1, 3, 4, dtype=F64)
    assert estimators.Shampoo().init_state(g, layout) == {}
    assert estimators.Shampoo(beta=1.0, bias_correction=True).init_state(g, layout) == {}
    with pytest.raises(TypeError, match="bias_correction"):
        estimators.Shampoo(bias_correction=1)


# --- NMode(merge=...) ----------------------------------------------------------------------------------------
def soap_merge(shape, max_dim):
    """The official SOAP's ``merge_dims`` rule, restated: scan the dims in order (unit dims included), keep a
    running product, close it when the next dim would push it past ``max_dim`` (a dim that alone exceeds it
    stands alone)."""
    out, run = [], 1
    for d in shape:
        if run * d <= max_dim:
            run *= d
        elif run > 1:
            out.append(run)
            run = d
        else:
            out.append(d)
            run = 1
    if run > 1 or not out:
        out.append(run)
    return tuple(out)


def meta_merge(shape, max_dim):
    """Meta's ``merge_small_dims`` (target dimensionality 1), restated: drop unit dims, walk from the last dim to
    the first, multiply into the current block while the product stays ``≤ max_dim``."""
    dims = [d for d in reversed(shape) if d != 1] or [1]
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= max_dim:
            out[-1] *= d
        else:
            out.append(d)
    return tuple(reversed(out))


@pytest.mark.parametrize("shape,max_dim,merge,view", [
    ((24, 16), 1024, "last", (384,)), ((24, 16), 1024, "first", (384,)),
    ((4, 5, 6), 20, "first", (20, 6)), ((4, 5, 6), 20, "last", (20, 6)),
    ((3, 3, 3), 9, "first", (9, 3)), ((3, 3, 3), 9, "last", (3, 9)),
    ((64, 32, 3, 3), 10000, "first", (6144, 3)), ((32, 3, 64, 64), 8192, "last", (96, 4096)),
    ((20000, 1, 5), 10000, "first", (20000, 5)), ((5, 3000, 4), 100, "last", (5, 3000, 4)),
])
def test_merge_examples(shape, max_dim, merge, view):
    layout = structures.NMode(max_dim=max_dim, merge=merge).plan(shape)
    assert layout.view_shape == view
    assert layout.kinds == tuple("dense" if d <= max_dim else "none" for d in view)


@given(shape=shapes(min_order=1, max_order=4, max_dim=6, max_numel=400), max_dim=st.integers(1, 40),
       merge=st.sampled_from(["first", "last"]), vectors=st.sampled_from(["diagonal", "dense"]), seed=seeds)
def test_merge_follows_the_reference_rules(shape, max_dim, merge, vectors, seed):
    """The view is SOAP's / Meta's merged shape, it is ``reshape`` (row-major, as both references), unview
    inverts it, and a matrix merged into one mode keeps a dense factor (only a true vector follows ``vectors``)."""
    layout = structures.NMode(max_dim=max_dim, merge=merge, vectors=vectors).plan(shape)
    squeezed = tuple(d for d in shape if d != 1)
    want = (soap_merge if merge == "first" else meta_merge)(shape, max_dim)
    if squeezed:
        assert layout.view_shape == want
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert torch.equal(layout.view(x), x.reshape(layout.view_shape))
    assert torch.equal(layout.unview(layout.view(x)), x)
    for d, kind in zip(layout.view_shape, layout.kinds, strict=True):
        if d == 1:
            assert kind == "none"
        elif len(squeezed) == 1 and d <= max_dim:
            assert kind == ("diagonal" if vectors == "diagonal" else "dense")
        else:
            assert kind == ("dense" if d <= max_dim else "none")


def test_merged_matrix_gets_one_factor_of_the_flattened_gradient():
    """24×16 at max_dim 1024: one 384×384 factor ``S = (1−ρ) vec(G) vec(G)ᵀ`` (Meta's merged factor)."""
    pc = Preconditioner(structures.NMode(max_dim=1024, merge="last"), estimators.Shampoo(beta=0.9), bases.Eigh(),
                        Power())
    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    layout = pc.plan(g.shape)
    ps = pc.init_state(layout.view(g).unsqueeze(0), layout)
    torch.testing.assert_close(ps.S[0][0], 0.1 * torch.outer(g.reshape(-1), g.reshape(-1)), rtol=1e-12, atol=1e-14)


def test_merge_default_off_and_needs_max_dim():
    assert structures.NMode().merge is None
    assert structures.NMode(max_dim=1024).plan((24, 16)).view_shape == (24, 16)
    with pytest.raises(ValueError, match="max_dim"):
        structures.NMode(merge="last")
    with pytest.raises(ValueError, match="merge"):
        structures.NMode(max_dim=4, merge="forward")


# --- SOAP: ε on the uncorrected √V, Normalize keeping the bias correction ----------------------------------------
def _soap_state(shape, gen):
    layout = structures.NMode().plan(shape)
    qs = [random_orthogonal(d, gen).unsqueeze(0) for d in layout.view_shape]
    ps = ParamState(Q=qs, S=[random_spd(d, gen).unsqueeze(0) for d in layout.view_shape],
                    lam=[torch.ones(1, d, dtype=F64) for d in layout.view_shape])
    return layout, ps


def _rotate(x, qs):
    """``Q_1ᵀ X Q_2`` generalised: ``(⊗_k Q_kᵀ) vec(X)``."""
    return kron_apply([q[0].T for q in qs], x)


def _unrotate(x, qs):
    return kron_apply([q[0] for q in qs], x)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2)])
@pytest.mark.parametrize("normalize", [False, True])
def test_soap_official_update(shape, normalize):
    """Over 6 steps, ``DenseSpectrum(β₂)`` · ``Power(½, ε, "outside", eps_uncorrected_beta=β₂)`` [· ``Normalize(rms=1,
    where="all", keep_bias_correction=(β₁, β₂))``] on the optimizer's ``m̂ = m/(1−β₁ᵗ)`` equals the official SOAP
    update ``√(1−β₂ᵗ)/(1−β₁ᵗ) · unrot(rot(m)/(√v + ε))`` [unrot(…) first scaled to unit RMS (1e-16 guard)]
    with ``v`` the EMA of ``rot(G)²`` (no bias correction inside)."""
    gen = torch.Generator().manual_seed(11)
    beta1, beta2, eps = 0.9, 0.95, 1e-3
    layout, ps = _soap_state(shape, gen)
    estimator = estimators.DenseSpectrum(estimators.Shampoo(beta=beta2), beta=beta2)
    applier = Power(p=0.5, eps=eps, eps_placement="outside", eps_uncorrected_beta=beta2)
    if normalize:
        applier = Normalize(applier, rms=1.0, where="all", keep_bias_correction=(beta1, beta2))
    pc = Preconditioner(structures.NMode(), estimator, bases.Eigh(), applier)
    ps.estimator = estimator.init_state(torch.zeros(1, *shape, dtype=F64), layout)
    m = torch.zeros(shape, dtype=F64)
    v = torch.zeros(shape, dtype=F64)
    for t in range(1, 7):
        g = torch.randn(shape, generator=gen, dtype=F64)
        m = beta1 * m + (1 - beta1) * g
        got = pc.apply(ps, g.unsqueeze(0), (m / (1 - beta1**t)).unsqueeze(0), layout, t)[0]
        rotated = _rotate(g, ps.Q)
        v = beta2 * v + (1 - beta2) * rotated * rotated
        direction = _unrotate(_rotate(m, ps.Q) / (v.sqrt() + eps), ps.Q)
        if normalize:
            direction = direction / (direction.pow(2).mean().sqrt() + 1e-16)
        want = math.sqrt(1 - beta2**t) / (1 - beta1**t) * direction
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("placement", ["factor", "outside"])
def test_power_eps_uncorrected_formula_and_default(placement):
    """Kronecker spectra: ``"factor"`` ``⊗(λ_k + ε/(1−βᵗ))^{-p}``, ``"outside"`` ``1/((⊗λ_k)^p + ε/(1−βᵗ)^p)``;
    the default (None) adds ε unchanged."""
    gen = torch.Generator().manual_seed(5)
    layout, ps = _soap_state((3, 4), gen)
    ps.lam = [0.1 + torch.rand(1, d, generator=gen, dtype=F64) for d in layout.view_shape]
    direction = torch.randn(1, 3, 4, generator=gen, dtype=F64)
    p, eps, beta, t = 0.25, 0.3, 0.9, 3
    bc = 1 - beta**t
    ctx = ApplyContext(ps=ps, layout=layout, grad=direction, step=t)
    lam = [x[0] for x in ps.lam]
    for option, e in ((None, eps), (beta, eps / bc if placement == "factor" else eps / bc**p)):
        got = Power(p=p, eps=eps, eps_placement=placement, eps_uncorrected_beta=option).apply(direction, ctx)[0]
        r = _rotate(direction[0], ps.Q)
        if placement == "factor":
            r = r * torch.outer((lam[0] + e).pow(-p), (lam[1] + e).pow(-p))
        else:
            r = r / (torch.outer(lam[0], lam[1]).pow(p) + e)
        torch.testing.assert_close(got, _unrotate(r, ps.Q), rtol=1e-12, atol=1e-14)
    assert Power().eps_uncorrected_beta is None


def test_normalize_defaults_unchanged_and_where_all():
    """Default: only layouts with a dense mode, target RMS ``rms``; ``where="all"`` normalises a vector too."""
    gen = torch.Generator().manual_seed(2)
    vector_layout = structures.NMode().plan((5,))  # diagonal
    ps = ParamState(Q=[None], S=[None], lam=[torch.ones(1, 5, dtype=F64)])
    x = torch.randn(1, 5, generator=gen, dtype=F64)
    ctx = ApplyContext(ps=ps, layout=vector_layout, grad=x, step=4)
    inner = Power(p=0.5, eps=0.0)
    assert torch.equal(Normalize(inner, rms=1.0).apply(x, ctx), x)
    got = Normalize(inner, rms=0.5, where="all").apply(x, ctx)
    torch.testing.assert_close(got, 0.5 * x / (x.pow(2).mean().sqrt() + 1e-16), rtol=1e-13, atol=0)
    got = Normalize(inner, rms=0.5, where="all", keep_bias_correction=(0.9, 0.99)).apply(x, ctx)
    want = 0.5 * x / (x.pow(2).mean().sqrt() + 1e-16) * math.sqrt(1 - 0.99**4) / (1 - 0.9**4)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    normalize = Normalize(inner)
    assert normalize.where == "dense" and normalize.keep_bias_correction is None
    for bad in ((0.9,), (0.9, 1.0), "0.9"):
        with pytest.raises(ValueError, match="keep_bias_correction"):
            Normalize(inner, keep_bias_correction=bad)


# --- KL prototype: λ-only damping, unclamped λ₀, the 3-D update order ------------------------------------------
def _kl_state(layout, gen):
    qs, lams, factors = [], [], []
    for d, kind in zip(layout.view_shape, layout.kinds, strict=True):
        qs.append(random_orthogonal(d, gen).unsqueeze(0) if kind == "dense" else None)
        lams.append(None if kind == "none" else 0.2 + torch.rand(1, d, generator=gen, dtype=F64))
        factors.append(random_spd(d, gen).unsqueeze(0) if kind == "dense" else None)
    return ParamState(Q=qs, S=factors, lam=lams)


def _copy(ps):
    return ps.map(lambda t: t.clone())


def _kl_reference(ps, grad, layout, beta, damping, into, floor, reads):
    """One KL update from the formulas, mode by mode: ``P_j = Q_j diag(1/λ_j) Q_jᵀ`` with the spectra that
    ``reads(k, part, new)`` names for mode ``k`` (``part`` "S" or "λ"; ``new`` the λ's written so far);
    ``Δ_k = G_(k)(⊗_{j≠k}P_j)G_(k)ᵀ/D_{-k}``; shift ``c_k = κ∏_{j≠k}mean(1/λ_j^old)`` on ``diag(QᵀΔQ)`` and, with
    ``into="factor_and_spectrum"``, on ``Δ_k``; ``λ_k ← max(ρλ_k + (1−ρ)(diag + c_k), floor)``."""
    dims, kinds = layout.view_shape, layout.kinds
    old = [None if lam is None else lam[0] for lam in ps.lam]
    qs = [None if q is None else q[0] for q in ps.Q]

    def inverse(j, lam):
        return mode_matrix(kinds[j], qs[j], None if lam is None else 1.0 / lam, dims[j])

    def delta(k, spectra):
        others = [inverse(j, spectra[j]) for j in range(len(dims)) if j != k]
        u = unfold(grad, k)
        return u @ (kron_all(others) if others else torch.ones(1, 1, dtype=F64)) @ u.T / (grad.numel() // dims[k])

    def shift(k):
        if not damping:
            return 0.0
        return damping * math.prod(
            float((1.0 / old[j]).mean()) for j in range(len(dims)) if j != k and old[j] is not None
        )

    new = list(old)
    factors = {}
    for k in reads("sequence"):
        if old[k] is None:
            continue
        q = qs[k] if qs[k] is not None else torch.eye(dims[k], dtype=F64)
        d_lam = delta(k, reads(k, "λ", new))
        new[k] = (beta * old[k] + (1 - beta) * (torch.diagonal(q.T @ d_lam @ q) + shift(k))).clamp_min(floor)
        if kinds[k] == "dense":
            d_s = delta(k, reads(k, "S", new))
            if into == "factor_and_spectrum":
                d_s = d_s + shift(k) * torch.eye(dims[k], dtype=F64)
            factors[k] = beta * ps.S[k][0] + (1 - beta) * d_s
    return new, factors


@given(shape=shapes(min_order=1, max_order=3, max_dim=4, max_numel=40), seed=seeds,
       max_dim=st.sampled_from([None, 2]), large=st.sampled_from(["none", "diagonal"]),
       into=st.sampled_from(["factor_and_spectrum", "spectrum"]), floor=st.sampled_from([0.0, 0.3]),
       order=st.sampled_from(["jacobi", "prototype"]))
def test_kl_damping_into_and_order(shape, seed, max_dim, large, into, floor, order):
    gen = torch.Generator().manual_seed(seed)
    layout = structures.NMode(max_dim=max_dim, large=large).plan(shape)
    ps = _kl_state(layout, gen)
    grad = torch.randn(layout.view_shape, generator=gen, dtype=F64)
    beta, damping = 0.6, 0.05
    before = _copy(ps)
    old = [None if lam is None else lam[0] for lam in before.lam]

    def reads(k, part=None, new=None):
        if k == "sequence":
            return [2, 1, 0] if order == "prototype" and layout.order == 3 else list(range(layout.order))
        if order == "prototype" and layout.order == 3:  # KLOpt.update_3d_preconditioner
            if k == 1 and part == "λ":
                return [old[0], old[1], new[2]]
            if k == 0:
                return [old[0], new[1], old[2]]
        return old

    estimators.KL(beta=beta, damping=damping, damping_into=into, floor=floor, order=order).update(
        ps, grad.unsqueeze(0), layout)
    want_lam, want_s = _kl_reference(before, grad, layout, beta, damping, into, floor, reads)
    for k in range(layout.order):
        if want_lam[k] is not None:
            torch.testing.assert_close(ps.lam[k][0], want_lam[k], rtol=1e-10, atol=1e-12)
        if k in want_s:
            torch.testing.assert_close(ps.S[k][0], want_s[k], rtol=1e-10, atol=1e-12)


def test_kl_prototype_order_differs_from_jacobi_in_3d_only():
    gen = torch.Generator().manual_seed(1)
    for shape, differs in (((3, 4, 5), True), ((4, 5), False)):
        layout = structures.NMode().plan(shape)
        ps = _kl_state(layout, gen)
        grad = torch.randn(1, *shape, generator=gen, dtype=F64)
        results = []
        for order in ("jacobi", "prototype"):
            state = _copy(ps)
            estimators.KL(beta=0.5, order=order).update(state, grad, layout)
            results.append(torch.cat([lam.reshape(-1) for lam in state.lam]))
        assert (not torch.allclose(*results, rtol=1e-6)) == differs


def test_kl_fill_without_damping_in_the_factor():
    """``damping_into="spectrum"``: the fill is ``(1−ρ) Gram_k(G)/D_{-k}`` (no κI), as the prototype's."""
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    for into, extra in (("spectrum", 0.0), ("factor_and_spectrum", 0.3)):
        pc = Preconditioner(structures.NMode(), estimators.KL(beta=0.9, damping=0.3, damping_into=into),
                            bases.QRPowerStep(every=5), Power())
        layout = pc.plan(g.shape)
        ps = pc.init_state(g.unsqueeze(0), layout)
        for k, d in enumerate(g.shape):
            want = 0.1 * (grams(g)[k] / (g.numel() // d) + extra * torch.eye(d, dtype=F64))
            torch.testing.assert_close(ps.S[k][0], want, rtol=1e-12, atol=1e-14)


def test_kl_unclamped_initial_lambda():
    """``floor_at_init=False``: λ₀ = ``init_lambda`` below the floor, and the first update reads it unclamped
    (then clamps); the default floors λ₀."""
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    layout = structures.NMode().plan(g.shape)
    floor_values = [max(10, d) ** -2.0 for d in g.shape]  # "dimension": max(10, min(d, 4000))^-2
    for at_init, lam0 in ((True, floor_values), (False, [1e-3, 1e-3])):
        estimator = estimators.KL(beta=0.9, init_lambda=1e-3, floor_at_init=at_init)
        pc = Preconditioner(structures.NMode(), estimator, bases.QRPowerStep(every=5), Power())
        ps = pc.init_state(g.unsqueeze(0), layout)
        for k in range(2):
            torch.testing.assert_close(ps.lam[k][0], torch.full((g.shape[k],), lam0[k], dtype=F64))
        before = _copy(ps)
        g2 = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
        estimator.update(ps, g2, layout)
        old = [lam[0] for lam in before.lam]

        def reads(k, part=None, new=None, old=old):
            return [0, 1] if k == "sequence" else old

        want, _ = _kl_reference(before, g2[0], layout, 0.9, 0.0, "factor_and_spectrum", 0.0, reads)
        for k in range(2):
            torch.testing.assert_close(ps.lam[k][0], want[k].clamp_min(floor_values[k]), rtol=1e-10, atol=1e-14)


def test_kl_new_options_defaults_and_validation():
    kl = estimators.KL()
    assert (kl.damping_into, kl.floor_at_init, kl.order) == ("factor_and_spectrum", True, "jacobi")
    with pytest.raises(ValueError, match="init_lambda"):
        estimators.KL(init_lambda=None, floor_at_init=False)
    with pytest.raises(ValueError, match="order"):
        estimators.KL(order="gauss_seidel")
    with pytest.raises(ValueError, match="damping_into"):
        estimators.KL(damping_into="factor")


# --- checkpoints written before these options ----------------------------------------------------------------
def _strip(description, names):
    if isinstance(description, dict):
        return {k: _strip(v, names) for k, v in description.items() if k not in names}
    return description


@pytest.mark.parametrize("order", ["apply_then_fold", "fold_then_apply"])
def test_checkpoint_without_the_new_fields_loads_only_into_their_defaults(order):
    """A saved configuration that lacks an option (a checkpoint older than it) matches the option's default only."""
    def make(param, **extra):
        pc = Preconditioner(structures.NMode(), estimators.KL(), bases.QRPowerStep(every=2), Power(), **extra)
        return Optimizer([param], pc, lr=0.1, state_dtype=F64)

    param = torch.nn.Parameter(torch.randn(3, 4, dtype=F64))
    opt = make(param)
    param.grad = torch.randn(3, 4, dtype=F64)
    opt.step()
    saved = opt.state_dict()
    new_fields = {"order", "merge", "damping_into", "floor_at_init"}
    saved["param_groups"][0]["preconditioner"] = _strip(saved["param_groups"][0]["preconditioner"], new_fields)
    fresh = torch.nn.Parameter(param.detach().clone())
    if order == "apply_then_fold":
        make(fresh).load_state_dict(saved)
    else:
        with pytest.raises(ValueError, match="another preconditioner configuration"):
            make(fresh, order=order).load_state_dict(saved)


@pytest.mark.parametrize("preset", ["shampoo", "kl_shampoo", "soap", "eshampoo"])
def test_presets_accept_the_preconditioner_options(preset):
    """Meta-style Shampoo needs ``first_step="update"`` and ``order="fold_then_apply"`` on a preset."""
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=F64))
    opt = getattr(precond, preset)([w], first_step="update", order="fold_then_apply")
    pc = opt.param_groups[0]["preconditioner"]
    assert pc.first_step == "update" and pc.order == "fold_then_apply"
    w.grad = torch.randn(4, 3, dtype=F64)
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w)  # "update": the first gradient moves the weight
