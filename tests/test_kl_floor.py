"""KL's floor on λ: the prototype's per-mode clamp and ``floor="product"``, the same bound on the product of every
mode's λ, for layouts with modes that get no factor (one-sided KL, modes above ``max_dim`` with ``large="none"``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import estimators
import precond
import structures
from estimators._common import spectrum_floor
from precond.ablate.variants import parse_variant
from precond.state import ParamState

from reference import F64, random_orthogonal
from strategies import shapes, structure_strategy


def _bound(d: int) -> float:
    """The prototype's ``c = max(10, min(d, 4000))`` (``λ^{-1/2} ≤ c``)."""
    return float(max(10, min(d, 4000)))


@settings(max_examples=60, deadline=None)
@given(shape=shapes(max_dim=5000, max_numel=10**12), structure=structure_strategy())
def test_the_product_floor_bounds_the_product_of_all_modes_and_splits_it_evenly(shape, structure) -> None:
    """With ``c_j`` of every mode of the view: ``∏_k floor_k = ∏_j c_j^{-2}`` over the modes with a spectrum ``k``
    and all modes ``j``; ``floor_k c_k²`` is the same for every ``k`` (an even split); with no mode lacking a
    spectrum, the floors are the prototype's ``c_k^{-2}``."""
    layout = structure.plan(shape)
    spectral = layout.spectral_modes
    if not spectral:
        return
    floors = {k: spectrum_floor("product", layout, k) for k in spectral}
    log_product = sum(math.log(f) for f in floors.values())
    assert log_product == pytest.approx(-2 * sum(math.log(_bound(d)) for d in layout.view_shape), rel=1e-12, abs=1e-9)
    shares = [floors[k] * _bound(layout.view_shape[k]) ** 2 for k in spectral]
    assert shares == pytest.approx([shares[0]] * len(shares), rel=1e-12)
    if len(spectral) == layout.order:
        assert [floors[k] for k in spectral] == [spectrum_floor("dimension", layout, k) for k in spectral]
    for k in spectral:
        assert spectrum_floor("dimension", layout, k) == _bound(layout.view_shape[k]) ** -2
        assert spectrum_floor(0.25, layout, k) == 0.25


@pytest.mark.parametrize("floor", ["dimension", "product"])
def test_one_sided_kl_lambda_follows_its_ema_above_the_product_floor(floor: str) -> None:
    """One-sided KL on a ``12 × 300`` weight (mode 1 without a factor, ``P_1 = I``): ``Δ_0 = G Gᵀ / 300`` and
    ``λ_0 ← ρ λ_0 + (1−ρ) diag(Q_0ᵀ Δ_0 Q_0)`` (Claim 3), in dense float64. With gradients of RMS 1e-3 the EMA is
    ~1e-6: above the product floor ``(12 · 300)^{-2} ≈ 7.7e-8`` and far below the prototype's ``12^{-2}``, which
    holds every λ at the floor."""
    gen = torch.Generator().manual_seed(3)
    layout = structures.OneSided(side="first").plan((12, 300))
    assert layout.kinds == ("dense", "none")
    q = random_orthogonal(12, gen)
    lam = torch.full((1, 12), 1e-6, dtype=F64)
    state = ParamState(Q=[q[None], None], S=[torch.eye(12, dtype=F64)[None], None], lam=[lam.clone(), None])
    grad = 1e-3 * torch.randn(1, 12, 300, generator=gen, dtype=F64)
    estimators.KL(beta=0.9, floor=floor).update(state, grad, layout)
    delta = grad[0] @ grad[0].T / 300
    ema = 0.9 * lam[0] + 0.1 * torch.diagonal(q.T @ delta @ q)
    want = ema.clamp_min(1.0 / 144 if floor == "dimension" else (12.0 * 300) ** -2)
    torch.testing.assert_close(state.lam[0][0], want, rtol=1e-12, atol=0)
    torch.testing.assert_close(state.S[0][0], 0.9 * torch.eye(12, dtype=F64) + 0.1 * delta, rtol=1e-12, atol=0)
    if floor == "product":
        assert bool((ema > (12.0 * 300) ** -2).all())  # the check above compared the unclamped EMA
    else:
        assert bool((state.lam[0][0] == 1.0 / 144).all())


def test_presets_and_the_workbench_pass_the_floor_to_kl_and_refuse_it_elsewhere() -> None:
    weight = torch.nn.Linear(6, 4).weight
    for optimizer, where in ((precond.kl_shampoo([weight], floor="product"), "estimator"),
                             (precond.kl_soap([weight], floor="product"), "factors"),
                             (parse_variant("structure=one_sided,floor=product").build([weight], lr=1e-3), "estimator"),
                             (parse_variant("kl_shampoo,floor=product").build([weight], lr=1e-3), "estimator")):
        estimator = optimizer.param_groups[0]["preconditioner"].estimator
        assert (estimator.factors if where == "factors" else estimator).floor == "product"
    assert parse_variant("estimator=kl,floor=1e-9").build([weight], lr=1e-3).param_groups[0][
        "preconditioner"].estimator.floor == 1e-9
    with pytest.raises(ValueError, match="floor needs a KL estimator"):
        precond.soap([weight], floor="product")
    with pytest.raises(ValueError, match="belongs to estimator kl or kl_soap"):
        parse_variant("estimator=shampoo,floor=product")
    with pytest.raises(ValueError, match="expected dimension .* product .* or a number"):
        parse_variant("estimator=kl,floor=tiny")
    with pytest.raises(ValueError, match="lower bound on λ"):
        estimators.KL(floor="products")


@given(st.sampled_from(["kl_shampoo", "estimator=kl", "structure=one_sided"]))
def test_the_floor_key_leaves_the_identity_of_variants_without_it(text: str) -> None:
    assert "floor" not in parse_variant(text).spec()
