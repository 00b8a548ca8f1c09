"""``Preconditioner(momentum_in_basis=True)``: the momentum kept rotated into the bases, ``m̃ = m ×_k Q_k``.

Every rotation is linear and every basis orthogonal, so in exact arithmetic the updates are those of the default
path (the momentum in the parameter's coordinates, rotated by the applier each step); the default path is the one
``tests/test_trajectories.py`` holds to the references. Checked here in float64 on weights of order 1–4, through
refreshes (whole buckets, staggered subsets, asynchronous installs, blocks, the emulated captured step, steps that do
not fold); the change of basis against dense float64 matrices; the work saved, counted exactly (one rotation of the
gradient's size per folding step); the resume and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from precond.ablate.build import build_optimizer
from precond.ablate.variants import parse_variant
from precond.bench.op_count import count_step_flops
from precond.contractions import change_basis
from tests.battery_problem import make_model, parameters, train

from reference import kron_all, unfold

F64 = torch.float64


def _largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-300)).item() for k in a)


def _orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), data=st.data(),
       seed=st.integers(0, 2**16))
def test_change_basis_is_the_dense_product_of_the_two_bases(shape, data, seed):
    """``change_basis(X, Q_old, Q_new, k)_(k) = Q_newᵀ Q_old X_(k)`` (mode-``k`` unfolding), in both of its product
    orders (it takes the cheaper, which depends on the other modes' size)."""
    gen = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(0, len(shape) - 1))
    batch = 2
    x = torch.randn(batch, *shape, generator=gen, dtype=F64)
    old = torch.stack([_orthogonal(shape[k], gen) for _ in range(batch)])
    new = torch.stack([_orthogonal(shape[k], gen) for _ in range(batch)])
    got = change_basis(x, old, new, k)
    for b in range(batch):
        expected = new[b].T @ old[b] @ unfold(x[b], k)
        torch.testing.assert_close(unfold(got[b], k), expected, rtol=1e-12, atol=1e-12)


def _run(preset: str, in_basis: bool, options: dict) -> dict[str, torch.Tensor]:
    model = make_model()
    optimizer = getattr(precond, preset)(model.parameters(), lr=1e-2, state_dtype=F64, every=2,
                                         momentum_in_basis=in_basis, **options)
    train(model, optimizer, range(1, 12))
    return parameters(model)


CASES = [
    ("kl_shampoo", {}),
    ("kl_shampoo", {"nesterov": True}),
    ("kl_shampoo", {"betas": (0.0, 0.95)}),  # no momentum: the shared rotation of the gradient alone
    ("kl_shampoo", {"stagger": True}),  # refreshes of parts of a bucket: the momentum of just those entries moves
    ("kl_shampoo", {"stagger": True, "async_refresh": True}),
    ("kl_shampoo", {"fold_every": 2}),  # steps that do not fold rotate the gradient themselves
    ("kl_shampoo", {"capture": "emulate"}),
    ("kl_shampoo", {"large": "block", "max_dim": 4}),
    ("kl_shampoo", {"track_drift": True, "drift_tolerance": 0.0}),
    ("soap", {}),
    ("kl_soap", {"stagger": True}),
    ("eshampoo", {"eps": 1e-6}),  # eigh refreshes, the first gradient used at once
]


@pytest.mark.parametrize("preset,options", CASES, ids=[f"{p}-{'-'.join(o) or 'plain'}" for p, o in CASES])
def test_the_updates_are_those_of_the_momentum_in_the_parameters_coordinates(preset, options):
    """The battery's model (a vector, matrices, a 3- and a 4-mode weight; branches without a gradient at some
    steps, so buckets split), 11 steps with refreshes every 2: the same parameters to float64 round-off."""
    default, in_basis = _run(preset, False, options), _run(preset, True, options)
    assert _largest_relative_difference(default, in_basis) < 1e-10


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
       members=st.integers(1, 3), nesterov=st.booleans(), fold_every=st.integers(1, 2), every=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_on_weights_of_any_order_the_trajectories_agree(shape, members, nesterov, fold_every, every, seed):
    """The same parameters, and the stored momentum is ``m ×_k Q_k`` of the default path's ``m`` and bases, formed
    here as the dense ``(⊗_k Q_k)ᵀ vec(m)`` (identity for a mode without a basis)."""
    def trajectory(in_basis: bool) -> tuple[list[torch.Tensor], list[dict]]:
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64)) for _ in range(members)]
        optimizer = precond.kl_shampoo(params, lr=1e-2, every=every, nesterov=nesterov, fold_every=fold_every,
                                       stagger=True, state_dtype=F64, momentum_in_basis=in_basis)
        for _ in range(3 * every + 2):
            for p in params:
                p.grad = torch.randn(shape, generator=gen, dtype=F64)
            optimizer.step()
        return [p.detach().clone() for p in params], [optimizer.state[p] for p in params]

    (default, default_states), (in_basis, in_basis_states) = trajectory(False), trajectory(True)
    for a, b in zip(default, in_basis, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for plain, rotated in zip(default_states, in_basis_states, strict=True):
        m = plain["momentum"]
        bases = plain["basis"]["Q"]
        rotation = kron_all([bases[str(k)] if str(k) in bases else torch.eye(d, dtype=F64)
                             for k, d in enumerate(m.shape)])
        expected = (rotation.T @ m.reshape(-1)).reshape(m.shape)
        torch.testing.assert_close(rotated["momentum"], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("preset,fold_every", [("kl_shampoo", 1), ("kl_shampoo", 2), ("soap", 1), ("soap", 2)])
def test_one_rotation_of_the_gradient_fewer(preset, fold_every):
    """Counted exactly (``torch.utils.flop_counter``; no refresh is due in the counted steps): on an ``m × n``
    matrix, ``2(m²n + mn²)`` product flops fewer per parameter — the applier's rotation of the momentum into the
    bases, ``Q_mᵀ M Q_n`` — at each step that folds for KL (whose fold forms ``R`` anyway; a step that does not
    fold rotates the gradient instead of the momentum), and at every step for SOAP (whose ``V`` reads ``R`` every
    step)."""
    m, n, members = 6, 4, 2

    def flops(in_basis: bool) -> float:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(m, n, generator=gen, dtype=F64)) for _ in range(members)]
        optimizer = getattr(precond, preset)(params, lr=1e-2, every=1000, fold_every=fold_every, state_dtype=F64,
                                             momentum_in_basis=in_basis)
        for _ in range(fold_every):  # the fill, then up to the first step that folds (step fold_every)
            for p in params:
                p.grad = torch.randn(m, n, generator=gen, dtype=F64)
            optimizer.step()
        grads = [[torch.randn(m, n, generator=gen, dtype=F64) for _ in params] for _ in range(fold_every)]
        return count_step_flops(optimizer, params, grads).total * fold_every  # one period: one step folds

    rotation = 2 * (m * m * n + m * n * n) * members
    saved_steps = fold_every if preset == "soap" else 1
    assert flops(False) - flops(True) == rotation * saved_steps


def test_the_resume_is_exact_and_a_checkpoint_of_the_other_setting_is_refused():
    def optimizer_of(model, in_basis=True):
        return precond.kl_shampoo(model.parameters(), lr=1e-2, every=2, stagger=True, state_dtype=F64,
                                  momentum_in_basis=in_basis)

    model = make_model()
    optimizer = optimizer_of(model)
    train(model, optimizer, range(1, 6))
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, range(6, 11))
    resumed = make_model()
    resumed.load_state_dict(saved_model)
    again = optimizer_of(resumed)
    again.load_state_dict(saved)
    train(resumed, again, range(6, 11))
    for name, value in parameters(model).items():
        assert torch.equal(value, parameters(resumed)[name]), name
    other = optimizer_of(make_model(), in_basis=False)
    with pytest.raises(ValueError, match="momentum_in_basis"):
        other.load_state_dict(saved)


def _power_preconditioner(**fields) -> precond.Preconditioner:
    return precond.Preconditioner(structure=structures.NMode(), estimator=estimators.KL(), basis=bases.QRPowerStep(),
                                  applier=precond.Power(), **fields)


def test_refusals_say_what_to_change():
    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match="momentum_in_basis=True needs the applier precond.Power.*Graft"):
        precond.shampoo(params, momentum_in_basis=True)
    with pytest.raises(ValueError, match="momentum_in_basis=True needs the applier precond.Power.*Normalize"):
        precond.one_sided_shampoo(params, momentum_in_basis=True)
    with pytest.raises(ValueError, match="fold_then_apply"):
        _power_preconditioner(momentum_in_basis=True, order="fold_then_apply")
    with pytest.raises(TypeError):
        _power_preconditioner(momentum_in_basis="yes")


def test_workbench_key():
    model = make_model()
    named = list(model.named_parameters())
    variant = parse_variant("kl_shampoo,momentum_in_basis=true")
    optimizer = build_optimizer(variant, named, lr=1e-2)
    assert optimizer.param_groups[0]["preconditioner"].momentum_in_basis
    composition = build_optimizer(parse_variant("estimator=kl,basis=qr,applier=power,momentum_in_basis=true"), named,
                                  lr=1e-2)
    assert composition.param_groups[0]["preconditioner"].momentum_in_basis


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"capture": True, "stagger": True, "async_refresh": True},
                                     {"capture": True, "fold_every": 2, "track_drift": True, "drift_tolerance": 0.0}],
                         ids=["eager", "captured_async", "captured_fold_every"])
def test_on_cuda_the_updates_are_those_of_the_default_path(options):
    """On CUDA (CUDA graphs, side-stream refreshes), float64 state so that the two paths agree to round-off."""
    shapes = [(12, 8), (12, 8), (8,), (3, 4, 5)]

    def run(in_basis: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64).cuda()) for s in shapes]
        optimizer = precond.kl_shampoo(params, lr=1e-2, every=3, state_dtype=F64, momentum_in_basis=in_basis,
                                       **options)
        for _ in range(11):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64).cuda()
            optimizer.step()
        return [p.detach().cpu() for p in params]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
