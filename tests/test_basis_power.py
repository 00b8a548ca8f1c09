"""``basis_power=p`` (``bases.QRPowerStep(power=p)``) as a preset keyword and a workbench key: it reaches the QR
power step of the presets that have one, is refused with the reason elsewhere, trains with the drift rule and
resumes exactly. The refresh's math (``qr(S^p Q)`` against ``p`` single float64 steps, the rescaled products, the
drift it leaves) is tested in ``tests/test_bases.py``."""

from __future__ import annotations

import pytest
import torch

import bases
import precond
from precond.ablate import parse_variant
from precond.ablate.build import build_optimizer
from precond.precision import tf32_matmuls

from small_training import assert_resume_is_exact, batches, flat_parameters, mlp, train, train_on_cuda


def _basis(optimizer: torch.optim.Optimizer):
    return optimizer.param_groups[0]["preconditioner"].basis


@pytest.mark.parametrize("preset", ["kl_shampoo", "kl_soap", "soap"])
def test_the_qr_presets_take_basis_power(preset):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    basis = _basis(getattr(precond, preset)([weight], lr=1e-3, basis_power=3))
    assert isinstance(basis, bases.QRPowerStep) and basis.power == 3
    assert _basis(getattr(precond, preset)([weight], lr=1e-3)).power == 1  # the published default


@pytest.mark.parametrize("preset", ["shampoo", "idealized_kl_shampoo", "eshampoo", "one_sided_shampoo"])
def test_presets_without_a_qr_power_step_refuse_basis_power_with_the_reason(preset):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="basis_power is the number of products of S in a QR power step"):
        getattr(precond, preset)([weight], lr=1e-3, basis_power=2)


@pytest.mark.parametrize("text, power", [("kl_shampoo,basis_power=2", 2), ("soap,basis_power=3", 3),
                                         ("estimator=kl,basis=qr,basis_power=2", 2), ("kl_shampoo", 1)])
def test_the_workbench_key_builds_the_power(text, power):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    assert _basis(build_optimizer(parse_variant(text), [weight], 1e-3)).power == power


@pytest.mark.parametrize("text, match", [
    ("estimator=kl,basis=eigh,basis_power=2", "belongs to basis qr, not to basis eigh"),
    ("kl_shampoo,basis_power=0", "basis_power"),
    ("kl_shampoo,basis_power=1.5", "basis_power"),
])
def test_the_workbench_refuses_basis_power_where_it_means_nothing(text, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(text)


def test_basis_power_with_the_tracked_drift_rule_trains_and_resumes_exactly():
    """The power changes only what a refresh returns: the drift check, the budget and the tracked diagonal see the
    new basis as they see any refreshed one; a state_dict round trip mid-run continues bit for bit."""
    data = batches(24, 5, 3)

    def optimizer_of(model):
        return precond.kl_shampoo(model.parameters(), lr=1e-2, every=2, stagger=True, basis_power=2,
                                  track_drift=True, drift_tolerance=0.1, refresh_budget=2)
    whole, _ = assert_resume_is_exact(lambda seed: mlp([5, 7, 3], seed), optimizer_of, data, cut=11)
    assert whole.stats()["drift_refreshes"] > 0


def test_basis_power_changes_the_trajectory_only_through_the_refreshes():
    """With T larger than the run no refresh happens after the first basis (``eigh``): p = 2 and p = 1 give the
    same parameters bit for bit; with T = 2 they differ."""
    data = batches(6, 5, 3)
    final = {}
    for every in (100, 2):
        for power in (1, 2):
            model = mlp([5, 7, 3])
            train(model, precond.kl_shampoo(model.parameters(), lr=1e-2, every=every, basis_power=power), data)
            final[every, power] = flat_parameters(model)
    assert torch.equal(final[100, 1], final[100, 2])
    assert not torch.equal(final[2, 1], final[2, 2])


@pytest.mark.gpu
def test_on_cuda_a_power_two_refresh_matches_two_float64_steps_and_trains_captured_as_eager():
    """On CUDA, in float32 with TF32 allowed around it: one refresh of ``p = 2`` against two positive-diagonal
    float64 QR steps on the CPU (a well-conditioned factor), and the captured, asynchronous fast step with
    ``basis_power=2`` against the eager one (float32 round-off)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    s = u @ torch.diag(torch.linspace(1.0, 0.2, 64, dtype=torch.float64)) @ u.T
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    expected = q
    for _ in range(2):
        product = s @ expected
        r = torch.linalg.cholesky(product.T @ product, upper=True)
        expected = torch.linalg.solve_triangular(r, product, upper=True, left=False)
    with tf32_matmuls(True):
        got = bases.QRPowerStep(every=1, power=2).refresh(s.float().cuda()[None], q.float().cuda()[None]).basis[0]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=0, atol=2e-4)

    (eager, _), (fast, _) = train_on_cuda(
        lambda: mlp([5, 7, 3]),
        lambda model, **options: precond.kl_shampoo(model.parameters(), lr=1e-2, every=3, stagger=True,
                                                    basis_power=2, on_nonfinite="ignore", **options),
        batches(30, 5, 3), [{}, {"capture": True, "async_refresh": True}])
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
