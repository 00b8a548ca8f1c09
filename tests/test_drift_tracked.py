"""``KL(track_drift=True)``: ``D_k = diag(Q_kᵀ S_k Q_k)`` kept current from the diagonal KL's λ update forms, so that
``drift_tolerance`` checks a basis with one ``d²`` reduction instead of an ``S_k Q_k`` product.

``D_k`` is checked against dense float64 ``diag(Q_kᵀ S_k Q_k)`` of the state (weights of orders 1–4, damping in
either place, rebalancing, both spectrum rules, staggered and asynchronous refreshes); the decisions and the
trajectory against the measured statistic; the check against the count of matrix products it issues."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import bases
import estimators
import precond
import structures
from precond.ablate.build import build_optimizer
from precond.ablate.variants import parse_variant
from precond.drift import DriftMonitor

import small_training as training

F64 = torch.float64


def _dense_diagonal(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(q.mT.double() @ s.double() @ q.double(), dim1=-2, dim2=-1)


def _tracked_units(opt):
    """``(S_k, Q_k, D_k)`` of every tracked mode, as stored in the state."""
    out = []
    for state in opt.state.values():
        estimator = state["estimator"]
        for key, q in state.get("basis", {}).get("Q", {}).items():
            out.append((estimator["S"][key], q, estimator[f"drift_diagonal_{key}"]))
    return out


class _Weights(torch.nn.Module):
    def __init__(self, shapes, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes)

    def loss(self, generator):
        return sum((w * torch.randn(w.shape, generator=generator)).sum() + 0.5 * w.square().sum() for w in
                   self.weights)


@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), min_size=1, max_size=2),
       damping=st.sampled_from([0.0, 1e-3]), damping_into=st.sampled_from(["factor_and_spectrum", "spectrum"]),
       rebalance=st.booleans(), refresh_spectrum=st.sampled_from(["keep", "reset"]),
       schedule=st.sampled_from([{}, {"stagger": True}, {"stagger": True, "async_refresh": True}]),
       seed=st.integers(0, 2**16))
def test_the_tracked_diagonal_is_diag_qt_s_q_of_the_state_after_every_step(shapes, damping, damping_into, rebalance,
                                                                           refresh_spectrum, schedule, seed):
    model = _Weights([(3, 4), *shapes], seed)  # a matrix, so that some mode is always tracked
    estimator = estimators.KL(beta=0.9, damping=damping, damping_into=damping_into, rebalance=rebalance,
                              refresh_spectrum=refresh_spectrum, track_drift=True)
    preconditioner = precond.Preconditioner(structure=structures.NMode(), estimator=estimator,
                                            basis=bases.QRPowerStep(every=2),
                                            applier=precond.Power(p=0.5, eps=1e-8, eps_placement="outside"))
    opt = precond.Optimizer(model.parameters(), preconditioner=preconditioner, lr=1e-2, momentum=0.9,
                            state_dtype=F64, **schedule)
    generator = torch.Generator().manual_seed(seed + 1)
    checked = 0
    for _ in range(9):
        opt.zero_grad()
        model.loss(generator).backward()
        opt.step()
        for s, q, d in _tracked_units(opt):
            torch.testing.assert_close(d, _dense_diagonal(s, q), rtol=1e-9, atol=1e-12)
            checked += 1
    assert checked >= 2 * 9  # at least the matrix's two modes after each step


def _model(seed: int = 0) -> torch.nn.Module:
    return training.mlp([6, 12, 5], seed)


def _batches(steps: int):
    return training.batches(steps, 6, 5)


def _build(model, track, tolerance=0.25, preset=precond.kl_shampoo, **options):
    return preset(model.parameters(), lr=3e-3, every=3, state_dtype=F64, drift_tolerance=tolerance,
                  track_drift=track, **options)


@pytest.mark.parametrize("preset", [precond.kl_shampoo, precond.kl_soap])
@pytest.mark.parametrize("options", [{"stagger": True}, {"stagger": True, "async_refresh": True},
                                     {"stagger": True, "capture": "emulate", "on_nonfinite": "ignore"}])
def test_the_tracked_check_makes_the_measured_checks_decisions_and_trajectory(options, preset):
    batches = _batches(30)
    runs = []
    for track in (False, True):
        model = _model()
        opt = _build(model, track, preset=preset, **options)
        training.train(model, opt, batches)
        runs.append((model, opt))
    (measured, opt_measured), (tracked, opt_tracked) = runs
    assert opt_tracked.refresh_counts() == opt_measured.refresh_counts()
    stats = opt_tracked.stats()
    assert 0 < stats["drift_refreshes"] < stats["drift_checks"]  # both decisions were made
    for a, b in zip(measured.parameters(), tracked.parameters(), strict=True):
        assert torch.equal(a, b)  # D_k is read by the check only: the updates are the same ops


def test_a_resumed_tracked_run_makes_the_same_decisions_as_an_uninterrupted_one():
    opt_whole, opt_resumed = training.assert_resume_is_exact(_model, lambda model: _build(model, True, stagger=True),
                                                             _batches(20), 8)
    assert any(key.startswith("drift_diagonal_") for state in opt_resumed.state_dict()["state"].values()
               for key in state["estimator"])  # D_k travels in the checkpoint
    for (_, _, d_whole), (_, _, d_resumed) in zip(_tracked_units(opt_whole), _tracked_units(opt_resumed),
                                                  strict=True):
        assert torch.equal(d_whole, d_resumed)


class _Products(TorchDispatchMode):
    """Counts the matrix products (``mm``, ``bmm``, ``matmul``'s kernels, ``einsum``'s) issued inside the block."""

    PRODUCTS = ("mm", "bmm", "addmm", "baddbmm", "addbmm", "dot")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.PRODUCTS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_tracked_check_issues_no_matrix_product_and_the_measured_one_does():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 20, generator=g, dtype=F64)
    s = x @ x.mT
    q = torch.linalg.qr(torch.randn(3, 8, 8, generator=g, dtype=F64)).Q
    diagonal = _dense_diagonal(s, q)
    counts = []
    for given_diagonal in (None, diagonal):
        monitor = DriftMonitor(0.1)
        with _Products() as products:
            monitor.measure([("a", 0), ("b", 0), ("c", 0)], 1, s, q, given_diagonal)
        counts.append(products.count)
    assert counts[0] > 0 and counts[1] == 0


def test_track_drift_is_refused_where_it_cannot_be_free_and_taken_where_it_can():
    with pytest.raises(ValueError, match="track_drift=True needs order='jacobi'"):
        estimators.KL(track_drift=True, order="prototype")
    with pytest.raises(ValueError, match="track_drift needs a KL estimator .* SOAP|track_drift needs a KL estimator"):
        precond.soap(_model().parameters(), track_drift=True)
    with pytest.raises(ValueError, match="track_drift is KL's tracked"):
        parse_variant("estimator=shampoo,track_drift=true")
    opt = precond.kl_soap(_model().parameters(), track_drift=True)
    assert opt.param_groups[0]["preconditioner"].estimator.factors.track_drift
    variant = parse_variant("kl_shampoo,track_drift=true,drift_tolerance=0.2")
    built = build_optimizer(variant, _model().parameters(), lr=1e-3)
    assert built.param_groups[0]["preconditioner"].estimator.track_drift
    composed = build_optimizer(parse_variant("estimator=kl,track_drift=true"), _model().parameters(), lr=1e-3)
    assert composed.param_groups[0]["preconditioner"].estimator.track_drift


@pytest.mark.gpu
def test_on_cuda_the_captured_tracked_check_matches_the_eager_one_and_its_diagonal_the_dense_one():
    runs = training.train_on_cuda(
        _model, lambda model, **options: precond.kl_shampoo(model.parameters(), lr=3e-3, every=3,
                                                            drift_tolerance=0.2, track_drift=True, tf32=False,
                                                            **options),
        _batches(24), [{"stagger": True}, {"stagger": True, "async_refresh": True, "capture": True,
                                           "on_nonfinite": "ignore"}])
    for _, opt in runs:
        for s, q, d in _tracked_units(opt):  # float32 state: D_k within float32 round-off of the dense diagonal
            expected = _dense_diagonal(s, q)
            torch.testing.assert_close(d.double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    (eager, eager_opt), (fast, fast_opt) = runs
    eager_stats, fast_stats = eager_opt.stats(), fast_opt.stats()
    assert eager_stats["drift_checks"] == fast_stats["drift_checks"]
    assert 0 < fast_stats["drift_refreshes"] < fast_stats["drift_checks"]
    torch.testing.assert_close(fast, eager, rtol=0, atol=5e-3)
