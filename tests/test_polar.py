"""``precond.Polar``: another applier's direction replaced by its polar factor on matrix views (Muon after a
preconditioner), against float64 SVD; its dispatch on views of order 1–4; its workbench key ``polar``."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from precond.ablate import build, variants
from precond.layout import Layout
from precond.parts import ApplyContext
from precond.state import ParamState

from reference import reference_scale
from strategies import seeds

CONVERGED = precond.NewtonSchulz(steps=14, coefficients="polar_express", dtype=torch.float64)
"""Polar Express (8 tabled steps, then its last polynomial) in float64: the polar factor to round-off for every
singular value above ``10⁻³·1.01·‖X‖_F``."""


@attrs.frozen(eq=False)
class Sandwich:
    """A test applier: ``M ↦ L M R`` on a matrix view (dense ``L``, ``R`` per batch entry), ``2M`` on any other
    view. It stands for a preconditioner's direction without any of the library's appliers."""

    left: torch.Tensor
    right: torch.Tensor

    def exponent(self, layout: Layout) -> float:
        return 0.25

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        if ctx.layout.order != 2:
            return 2 * direction
        return self.left @ direction @ self.right


def _well_conditioned(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``O diag(d)``, ``O`` orthogonal and ``d ∈ [0.5, 2]``: ``κ ≤ 4``."""
    orthogonal, _ = torch.linalg.qr(torch.randn(batch, size, size, dtype=torch.float64, generator=generator))
    scales = 0.5 + 1.5 * torch.rand(batch, 1, size, dtype=torch.float64, generator=generator)
    return orthogonal * scales


def _direction(batch: int, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """``U diag(σ) Vᵀ`` with ``σ ∈ [0.1, 1]``: with the sandwich, ``κ ≤ 160``, so every singular value of ``L M R``
    is above ``2·10⁻³‖L M R‖_F`` (at most 10 of them), inside Polar Express's range."""
    u = _well_conditioned(batch, rows, generator)[..., : min(rows, cols)]
    v = _well_conditioned(batch, cols, generator)[..., : min(rows, cols)]
    u, v = torch.linalg.qr(u)[0], torch.linalg.qr(v)[0]
    sigma = 0.1 + 0.9 * torch.rand(batch, 1, min(rows, cols), dtype=torch.float64, generator=generator)
    return (u * sigma) @ v.mT


def _context(layout: Layout, direction: torch.Tensor) -> ApplyContext:
    ps = ParamState.empty(layout, False, direction.shape[0], direction.dtype, direction.device)
    return ApplyContext(ps=ps, layout=layout, grad=direction, step=1)


@given(rows=st.integers(2, 10), cols=st.integers(2, 10), batch=st.integers(1, 3),
       scale=st.sampled_from(["match_rms_adamw", "none", "original"]), seed=seeds)
def test_polar_is_the_svd_polar_factor_of_the_inner_direction(rows, cols, batch, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    direction = _direction(batch, rows, cols, generator)
    inner = Sandwich(_well_conditioned(batch, rows, generator), _well_conditioned(batch, cols, generator).mT)
    layout = structures.NMode().plan((rows, cols))
    out = precond.Polar(inner, attrs.evolve(CONVERGED, scale=scale)).apply(direction, _context(layout, direction))
    u, _, vh = torch.linalg.svd(inner.left @ direction @ inner.right, full_matrices=False)
    expected = reference_scale(scale, rows, cols) * (u @ vh)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9 * max(1.0, reference_scale(scale, rows, cols)))


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), batch=st.integers(1, 2), seed=seeds)
def test_polar_orthogonalises_matrix_views_only(shape, batch, seed):
    """Views of order 1, 3 and 4 (vectors, conv kernels under ``NMode``; size-1 modes are dropped) keep the inner
    direction exactly; a matrix view gets unit singular values (``scale="none"``)."""
    layout = structures.NMode().plan(tuple(shape))
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(batch, *layout.view_shape, dtype=torch.float64, generator=generator)
    if layout.order == 2:
        direction = _direction(batch, *layout.view_shape, generator)
    rows, cols = (layout.view_shape + (1, 1))[:2]
    inner = Sandwich(torch.eye(rows, dtype=torch.float64), torch.eye(cols, dtype=torch.float64))
    out = precond.Polar(inner, CONVERGED).apply(direction, _context(layout, direction))
    if layout.order != 2:
        assert torch.equal(out, 2 * direction)
    else:
        singular = torch.linalg.svdvals(out)
        torch.testing.assert_close(singular, torch.ones_like(singular), rtol=0, atol=1e-9)


def test_polar_step_of_kl_shampoo_has_the_scale_as_every_singular_value():
    """A whole step of KL factors with ``Polar``: the matrix's update ``ΔW/η`` has every singular value equal to
    ``√max(1, A/B)`` (a polar factor, closed form), while the bias gets the inner ``Power`` step (not a unit
    vector)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(9, 6, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(9, dtype=torch.float64))
    preconditioner = precond.Preconditioner(
        structure=structures.NMode(), estimator=estimators.KL(), basis=bases.QRPowerStep(every=2),
        applier=precond.Polar(precond.Power(), attrs.evolve(CONVERGED, scale="original")))
    optimizer = precond.Optimizer([weight, bias], preconditioner=preconditioner, lr=0.1, momentum=0.9,
                                 state_dtype=torch.float64)
    for _ in range(5):
        before = weight.detach().clone(), bias.detach().clone()
        weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
        optimizer.step()
    singular = torch.linalg.svdvals((before[0] - weight.detach()) / 0.1)
    torch.testing.assert_close(singular, torch.full_like(singular, math.sqrt(9 / 6)), rtol=0, atol=1e-8)
    bias_step = (before[1] - bias.detach()) / 0.1
    assert torch.isfinite(bias_step).all() and abs(float(torch.linalg.vector_norm(bias_step)) - 1.0) > 1e-3


def test_polar_refuses_momentum_in_basis():
    with pytest.raises(ValueError, match="momentum_in_basis=True needs the applier precond.Power"):
        precond.Preconditioner(structure=structures.NMode(), estimator=estimators.KL(), basis=bases.QRPowerStep(),
                               applier=precond.Polar(precond.Power()), momentum_in_basis=True)


def test_polar_refuses_an_inner_that_is_not_an_applier():
    with pytest.raises(TypeError):
        precond.Polar("power")
    with pytest.raises(TypeError):
        precond.Polar(precond.Power(), newton_schulz="jordan")


def test_workbench_polar_key_builds_polar_inside_normalize_and_graft():
    def applier(spec: str):
        return build.make_preconditioner(variants.parse_variant(spec).options).applier

    for scale in ("original", "match_rms_adamw"):
        plain = applier(f"estimator=kl,polar={scale}")
        assert isinstance(plain, precond.Polar) and isinstance(plain.inner, precond.Power)
        assert plain.newton_schulz == precond.NewtonSchulz(scale=scale)  # Muon's iteration, the named scale
    normalized = applier("estimator=kl,polar=original,normalize=0.2")
    assert isinstance(normalized, precond.Normalize) and isinstance(normalized.inner, precond.Polar)
    grafted = applier("estimator=kl,polar=original,graft=adam")
    assert isinstance(grafted, precond.Graft) and isinstance(grafted.inner, precond.Polar)
    assert isinstance(applier("estimator=kl,polar=none"), precond.Power)
    assert applier("estimator=kl,polar=original,polar_dtype=float32").newton_schulz.dtype == torch.float32
    with pytest.raises(ValueError, match="polar_dtype"):
        applier("estimator=kl,polar_dtype=float32")
    assert "polar" not in dict(variants.parse_variant("estimator=kl").settings)  # old variants keep their keys


def test_workbench_polar_key_is_refused_by_a_preset():
    with pytest.raises(ValueError, match="polar"):
        variants.parse_variant("kl_shampoo,polar=original")
    with pytest.raises(ValueError, match="match_rms_adamw"):
        variants.parse_variant("estimator=kl,polar=true")


def _trajectory(capture, device: str = "cpu", steps: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(device))
              for shape in [(4, 5), (5, 3), (3, 2, 4), (6,)]]
    preconditioner = precond.Preconditioner(
        structure=structures.NMode(), estimator=estimators.KL(), basis=bases.QRPowerStep(every=3),
        applier=precond.Polar(precond.Power(), attrs.evolve(CONVERGED, scale="match_rms_adamw")))
    optimizer = precond.Optimizer(params, preconditioner=preconditioner, lr=1e-2, momentum=0.9, weight_decay=0.1,
                                  state_dtype=torch.float64, capture=capture, stagger=True)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device)
        optimizer.step()
    return [p.detach().cpu() for p in params]


def test_emulated_capture_of_polar_gives_the_eager_updates():
    for eager, captured in zip(_trajectory(False), _trajectory("emulate"), strict=True):
        torch.testing.assert_close(captured, eager, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
def test_cuda_graph_capture_of_polar_gives_the_eager_updates():
    """CUDA graphs replayed with the float64 iteration: the eager CUDA updates to round-off."""
    for eager, captured in zip(_trajectory(False, "cuda"), _trajectory(True, "cuda"), strict=True):
        torch.testing.assert_close(captured, eager, rtol=1e-12, atol=1e-14)
