"""``drift_tolerance``: a due basis refresh runs only when ``Q_kᵀ S_k Q_k`` has drifted from diagonal.

The statistic is checked against dense float64 math, the decisions against that statistic recomputed from the state
before each step, and the trajectories against the fixed schedule (τ = 0) and against themselves across a resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precond
from precond.compatibility import Incompatible
from precond.drift import offdiagonal_ratio

import small_training as training

F64 = torch.float64


def _dense_ratio(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    a = q.mT @ s @ q
    off = a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
    return torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(a)


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), batch=st.integers(1, 3), seed=st.integers(0, 2**16), mix=st.floats(0.0, 1.0))
def test_the_ratio_is_the_relative_offdiagonal_norm_of_qt_s_q(d, batch, seed, mix):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d, 2 * d, generator=g, dtype=F64)
    s = x @ x.mT / (2 * d)
    eigenvectors = torch.linalg.eigh(s).eigenvectors
    other = torch.linalg.qr(torch.randn(batch, d, d, generator=g, dtype=F64)).Q
    q = torch.linalg.qr(eigenvectors + mix * other).Q  # from the eigenbasis (mix = 0) to a random basis
    expected = _dense_ratio(s, q)
    torch.testing.assert_close(offdiagonal_ratio(s, q), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(offdiagonal_ratio(s.float(), q.float()).double(), expected, rtol=0, atol=3e-3)


def test_the_ratio_of_an_eigenbasis_is_zero_and_of_a_zero_factor_too():
    s = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=F64))[None]
    assert offdiagonal_ratio(s, torch.eye(3, dtype=F64)[None]).item() == 0.0
    assert offdiagonal_ratio(torch.zeros(1, 3, 3, dtype=F64), torch.eye(3, dtype=F64)[None]).item() == 0.0
    # a rotation by 45° in the (0, 1) plane of diag(3, 2): A = [[2.5, 0.5], [0.5, 2.5]], r = √(0.5/13)
    c = 2**-0.5
    q = torch.tensor([[c, -c], [c, c]], dtype=F64)[None]
    s2 = torch.diag(torch.tensor([3.0, 2.0], dtype=F64))[None]
    assert offdiagonal_ratio(s2, q).item() == pytest.approx((0.5 / 13) ** 0.5, abs=1e-14)


def _model(seed: int = 0) -> torch.nn.Module:
    return training.mlp([6, 12, 5], seed)


def _batches(steps: int):
    return training.batches(steps, 6, 5)


def _build(model, tolerance, **options):
    return precond.kl_shampoo(model.parameters(), lr=3e-3, every=3, state_dtype=F64, drift_tolerance=tolerance,
                              **options)


@pytest.mark.parametrize("options", [{}, {"stagger": True}, {"stagger": True, "async_refresh": True},
                                     {"stagger": True, "capture": "emulate", "on_nonfinite": "ignore"}])
def test_a_zero_tolerance_refreshes_every_due_basis_exactly_as_the_fixed_schedule(options):
    batches = _batches(14)
    fixed, drifting = _model(), _model()
    opt_fixed, opt_drift = _build(fixed, None, **options), _build(drifting, 0.0, **options)
    training.train(fixed, opt_fixed, batches)
    training.train(drifting, opt_drift, batches)
    for a, b in zip(fixed.parameters(), drifting.parameters(), strict=True):
        assert torch.equal(a, b)
    stats = opt_drift.stats()
    assert stats["drift_checks"] == stats["drift_refreshes"] > 0
    assert opt_fixed.refresh_counts() == {}


def _units(opt):
    """(p, k, Q_k, S_k) of every refreshed mode, as views of the state."""
    out = []
    for p in (p for group in opt.param_groups for p in group["params"]):
        state = opt.state[p]
        for key, q in state.get("basis", {}).get("Q", {}).items():
            out.append((p, int(key), q, state["estimator"]["S"][key]))
    return out


@pytest.mark.parametrize("stagger", [False, True])
@pytest.mark.parametrize("tolerance", [0.15, 0.3])
def test_each_due_basis_is_refreshed_exactly_when_its_drift_before_the_step_reaches_the_tolerance(tolerance, stagger):
    model = _model()
    opt = _build(model, tolerance, stagger=stagger)
    refreshed = kept = 0
    for x, y in _batches(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        before = {(id(p), k): (q.clone(), _dense_ratio(s[None], q[None]).item()) for p, k, q, s in _units(opt)}
        opt.step()
        for p, k, q, _ in _units(opt):
            offset, step = opt.refresh_offset(p, k), int(opt.state[p]["step"])  # the update this step() made
            old, ratio = before.get((id(p), k), (None, None))
            if old is None or (step + offset) % 3 != 0:
                assert old is None or torch.equal(q, old)  # not due: never touched
                continue
            if abs(ratio - tolerance) < 1e-9:
                continue  # at the threshold: either decision is right
            if ratio >= tolerance:
                assert not torch.equal(q, old)
                refreshed += 1
            else:
                assert torch.equal(q, old)
                kept += 1
    assert refreshed > 0 and kept > 0  # both decisions were exercised
    assert opt.stats()["drift_refreshes"] == refreshed and opt.stats()["drift_checks"] == refreshed + kept


def test_the_counts_per_unit_add_up_and_name_the_parameters():
    model = _model()
    opt = precond.kl_shampoo(list(model.named_parameters()), lr=3e-3, every=3, state_dtype=F64, drift_tolerance=0.3)
    training.train(model, opt, _batches(12))
    counts = opt.refresh_counts()
    assert set(counts) == {"0.weight", "2.weight"}
    assert sum(c["checks"] for modes in counts.values() for c in modes.values()) == opt.stats()["drift_checks"]
    # 12 gradients: the first fills the factors, then 11 updates, due after updates 3, 6 and 9
    assert all(0 <= c["refreshes"] <= c["checks"] == 3 for modes in counts.values() for c in modes.values())


@pytest.mark.parametrize("options", [{"stagger": True}, {"stagger": True, "async_refresh": True}, {}])
def test_a_resumed_run_makes_the_same_decisions_as_an_uninterrupted_one(options):
    opt_whole, _ = training.assert_resume_is_exact(_model, lambda model: _build(model, 0.25, **options),
                                                   _batches(20), 8)
    assert 0 < opt_whole.stats()["drift_refreshes"] < opt_whole.stats()["drift_checks"]


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, float("nan")])
def test_a_bad_tolerance_is_refused_with_what_to_pass(bad):
    with pytest.raises(ValueError, match="drift_tolerance must be None .* a number in \\[0, 1\\]"):
        _build(_model(), bad)


def test_drift_with_overlap_backward_is_refused_with_the_remedy():
    with pytest.raises(Incompatible, match="leave overlap_backward off with drift_tolerance"):
        _build(_model(), 0.1, overlap_backward=True, on_nonfinite="ignore")


@pytest.mark.gpu
def test_on_cuda_the_captured_asynchronous_step_with_drift_matches_the_eager_one():
    (eager, eager_opt), (fast, fast_opt) = training.train_on_cuda(
        _model, lambda model, **options: precond.kl_shampoo(model.parameters(), lr=3e-3, every=3,
                                                            drift_tolerance=0.2, tf32=False, **options),
        _batches(24), [{"stagger": True}, {"stagger": True, "async_refresh": True, "capture": True,
                                           "on_nonfinite": "ignore"}])
    eager_stats, fast_stats = eager_opt.stats(), fast_opt.stats()
    assert eager_stats["drift_checks"] == fast_stats["drift_checks"]
    assert 0 < fast_stats["drift_refreshes"] < fast_stats["drift_checks"]
    torch.testing.assert_close(fast, eager, rtol=0, atol=5e-3)


def test_unnamed_parameters_of_one_shape_are_counted_apart():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Tanh(), torch.nn.Linear(4, 4, bias=False))
    opt = precond.kl_shampoo(model.parameters(), lr=3e-3, every=3, state_dtype=F64, drift_tolerance=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(6, 4, dtype=torch.float32, generator=generator)).square().mean().backward()
        opt.step()
    counts = opt.refresh_counts()
    assert len(counts) == 2, counts  # both (4, 4) weights, not one label overwritten by the other
    assert sum(c["checks"] for modes in counts.values() for c in modes.values()) == opt.stats()["drift_checks"] == 4
