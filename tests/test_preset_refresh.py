"""``refresh`` as a preset keyword and a workbench key: ``"qr"`` (default) keeps the preset's ``bases.QRPowerStep``,
``"cholesky_qr64"`` replaces an unsorted one by the two-pass float64 Cholesky-QR refresh
(``bases.CholeskyQR(every, precision="float64", plain_passes=1)``); every other use is refused with the reason.

The numerical test runs ``kl_shampoo``/``kl_soap`` with ``every=1`` and checks each refreshed ``Q_k`` against
dense float64 Householder QR written here, from the factor ``S_k`` and the previous basis the refresh read:
``orth(Y)``, the Q factor of ``Y = Q R`` with ``diag(R) > 0``, for ``Y = S_k Q_prev`` in the first ``warmup``
refreshes (QR power steps) and ``Y = (S_k + δI) Q_prev``, ``δ = shift·tr(S_k)/d_k``, after them. The refresh's
own math near the eigenbasis (ill-conditioned ``Y``) is tested in ``tests/test_cholesky_qr.py``.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases
import precond
from precond.ablate import parse_variant
from precond.ablate.build import build_optimizer

from reference import F64
from small_training import assert_resume_is_exact, batches, flat_parameters, mlp, train, train_on_cuda
from strategies import seeds

ACCEPTING = ["kl_shampoo", "kl_soap"]
"""The presets whose basis is an unsorted QR power step."""

WITHOUT_QR = ["shampoo", "idealized_kl_shampoo", "eshampoo", "one_sided_shampoo", "muon"]
"""Presets whose basis is no QR power step (``eigh``, or Muon's identity)."""

U = {F64: 2.0**-53, torch.float32: 2.0**-24}
"""Unit round-off of each dtype."""

C = 16
"""The constant of the tolerance ``C·d·u·κ₂(Y)`` (see :func:`_tolerance`)."""


def _weights() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(6, 5, dtype=F64)), torch.nn.Parameter(torch.randn(4, 3, 2, dtype=F64))]


def _basis(optimizer: torch.optim.Optimizer):
    return optimizer.param_groups[0]["preconditioner"].basis


@settings(max_examples=20, deadline=None)
@given(preset=st.sampled_from(ACCEPTING), every=st.integers(1, 50), stagger=st.booleans())
def test_the_keyword_reaches_the_basis_of_the_unsorted_qr_presets(preset, every, stagger):
    basis = _basis(getattr(precond, preset)(_weights(), every=every, stagger=stagger, refresh="cholesky_qr64"))
    assert type(basis) is bases.CholeskyQR
    assert (basis.every, basis.precision, basis.plain_passes) == (every, "float64", 1)
    assert basis == bases.CholeskyQR(every=every, precision="float64", plain_passes=1)  # warmup, shift: defaults
    assert _basis(getattr(precond, preset)(_weights(), every=every)) == bases.QRPowerStep(every=every)
    assert _basis(getattr(precond, preset)(_weights(), every=every, refresh="qr")) == bases.QRPowerStep(every=every)
    assert _basis(getattr(precond, preset)(_weights(), refresh="cholesky_qr64", basis_power=1)).every == 10


def test_every_is_the_one_field_the_two_refreshers_share():
    """``with_refresh`` carries ``every`` alone; a field added to both classes must be carried too (or not, on
    purpose): this fails until ``with_refresh`` is looked at again."""
    assert set(attrs.fields_dict(bases.QRPowerStep)) & set(attrs.fields_dict(bases.CholeskyQR)) == {"every"}


@pytest.mark.parametrize("preset", ACCEPTING + ["soap"])
def test_an_unknown_value_is_refused_naming_the_accepted_ones(preset):
    for bad in ("householder", "cholesky_qr", "QR", None):
        with pytest.raises(ValueError, match=r"refresh must be 'qr' .* or 'cholesky_qr64' .*, got"):
            getattr(precond, preset)(_weights(), refresh=bad)


@pytest.mark.parametrize("preset", WITHOUT_QR)
@pytest.mark.parametrize("refresh", ["cholesky_qr64", "qr"])
def test_presets_without_a_qr_power_step_refuse_refresh_with_the_reason(preset, refresh):
    with pytest.raises(ValueError, match=r"chooses how a QR power step \(bases.QRPowerStep\) refreshes the basis; "
                                         r"this preset refreshes its basis with (Eigh|Identity)"):
        getattr(precond, preset)(_weights(), refresh=refresh)


@pytest.mark.parametrize("kfac", ["kfac", "ekfac"])
def test_the_model_presets_refuse_refresh_with_the_reason(kfac):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"this preset refreshes its basis with Eigh"):
        getattr(precond, kfac)(model, refresh="cholesky_qr64")
    assert not any(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                   or module._backward_pre_hooks for module in model.modules())  # refused before any hook


def test_soap_keeps_its_qr_and_refuses_the_cholesky_refresh_because_it_sorts():
    assert _basis(precond.soap(_weights(), every=3, refresh="qr")) == bases.QRPowerStep(every=3, sort=True)
    with pytest.raises(ValueError, match=r"needs an unsorted QR power step; this preset's \(SOAP's\) sorts"):
        precond.soap(_weights(), refresh="cholesky_qr64")


@pytest.mark.parametrize("preset", ACCEPTING)
def test_the_cholesky_refresh_refuses_a_basis_power(preset):
    with pytest.raises(ValueError, match=r"refresh='cholesky_qr64' with basis_power=2: the power is the number of "
                                         r"products of S"):
        getattr(precond, preset)(_weights(), refresh="cholesky_qr64", basis_power=2)
    assert _basis(getattr(precond, preset)(_weights(), refresh="qr", basis_power=2)).power == 2


def _q_factor(y: torch.Tensor) -> torch.Tensor:
    """Float64 Householder Q of ``y`` with ``diag(R) > 0`` (the unique Q factor; a zero pivot has no sign)."""
    q, r = torch.linalg.qr(y)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(-2)


def _tolerance(d: int, kappa: float, work: torch.dtype, stored: torch.dtype) -> float:
    """How far the stored ``Q`` may lie from the float64 reference, entrywise.

    - Both computations are backward stable: each gives the Q factor of ``Y + ΔY`` with ``‖ΔY‖ ≤ c·d·u·‖Y‖₂``
      (forming ``Y = S Q`` in the work dtype: ``γ_d``; Householder QR: ``O(d·u)``, Higham, *Accuracy and Stability
      of Numerical Algorithms*, Thm 19.4; the float64 shifted Cholesky-QR refresh: as Householder QR, see
      ``bases/cholesky_qr.py``), and the Q factor's first-order condition number is at most ``√2·κ₂(Y)``
      (Higham §19.9). ``κ₂(Y) = κ₂(S + δI)`` since ``Q_prev`` is orthogonal. Two such computations differ by at
      most ``2·√2·c·d·u·κ₂``; ``C = 16`` allows ``c`` up to about 5 (the largest ratio seen on CPU was 1.4, at
      ``d ≤ 6`` where a few ulps are all there is). ``u`` is the work dtype's: float64 for the Cholesky refreshes,
      the state's for the warm-up QR power steps (they work in the factor's dtype).
    - The float64 refresh's result is rounded to the state dtype: ``|fl(q) − q| ≤ u·|q| ≤ u`` per entry.
    """
    rounding = U[stored] if stored != work else 0.0
    return C * d * U[work] * kappa + rounding


@settings(max_examples=12, deadline=None)
@given(preset=st.sampled_from(ACCEPTING), seed=seeds, state_dtype=st.sampled_from([F64, torch.float32]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_each_refresh_is_householder_qr_of_the_shifted_product_in_float64(preset, seed, state_dtype, scale):
    """``every=1``: each step after the first refreshes every factor's basis from the folded ``S_k`` and the basis
    before the step; refresh ``n`` (0-based) is a QR power step while ``n < warmup``, the float64 Cholesky-QR
    after. The float32 state is the production case: float64 work, the basis rounded to float32."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.nn.Parameter(torch.randn(6, 5, generator=gen, dtype=F64)),
               torch.nn.Parameter(torch.randn(4, 3, 2, generator=gen, dtype=F64))]
    opt = getattr(precond, preset)(weights, lr=1e-2, every=1, refresh="cholesky_qr64", state_dtype=state_dtype)
    basis = _basis(opt)
    steps = basis.warmup + 4  # the first step only fills the statistics; then warmup + 3 Cholesky-QR refreshes
    for step in range(1, steps + 1):
        before = {(i, k): q.clone() for i, w in enumerate(weights) if opt.state[w]
                  for k, q in opt.state[w]["basis"]["Q"].items()}
        for w in weights:
            w.grad = scale * torch.randn(w.shape, generator=gen, dtype=F64)
        opt.step()
        if step == 1:
            continue
        n = step - 2  # this step's refresh, counted from 0
        work = F64 if n >= basis.warmup else state_dtype
        for i, w in enumerate(weights):
            assert sorted(opt.state[w]["basis"]["Q"]) == [str(k) for k in range(w.ndim)]
            for k, q in opt.state[w]["basis"]["Q"].items():
                s, previous = opt.state[w]["estimator"]["S"][k].to(F64), before[i, k].to(F64)
                d = s.shape[-1]
                delta = basis.shift * torch.trace(s) / d if n >= basis.warmup else 0.0
                shifted = s + delta * torch.eye(d, dtype=F64)
                want = _q_factor(shifted @ previous)
                tolerance = _tolerance(d, torch.linalg.cond(shifted).item(), work, state_dtype)
                assert q.dtype == state_dtype
                torch.testing.assert_close(q.to(F64), want, rtol=0, atol=tolerance,
                                           msg=lambda m, n=n, i=i, k=k: f"refresh {n}, weight {i}, mode {k}: {m}")
    assert opt.stats()["cholesky_qr_kept_old_basis"] == 0


@pytest.mark.parametrize("preset", ACCEPTING)
def test_refresh_qr_is_the_preset_bit_for_bit(preset):
    data = batches(9, 5, 3)
    final = []
    for options in ({}, {"refresh": "qr"}):
        model = mlp([5, 7, 3])
        train(model, getattr(precond, preset)(model.parameters(), lr=1e-2, every=2, **options), data)
        final.append(flat_parameters(model))
    assert torch.equal(final[0], final[1])


def test_the_cholesky_refresh_trains_and_resumes_exactly():
    """A ``state_dict`` round trip mid-run continues bit for bit (the basis configuration travels with it), with
    staggered refreshes, and the trajectory differs from QR's only by what the refreshes return."""
    data = batches(14, 5, 3)

    def optimizer_of(model):
        return precond.kl_shampoo(model.parameters(), lr=1e-2, every=2, stagger=True, refresh="cholesky_qr64")
    whole, _ = assert_resume_is_exact(lambda seed: mlp([5, 7, 3], seed), optimizer_of, data, cut=7)
    assert whole.stats()["cholesky_qr_kept_old_basis"] == 0


@pytest.mark.parametrize("text, every", [("kl_shampoo,refresh=cholesky_qr64", 10),
                                         ("kl_soap,every=4,refresh=cholesky_qr64", 4)])
def test_the_workbench_key_builds_the_float64_refresh(text, every):
    variant = parse_variant(text)
    assert parse_variant(variant.spec()) == variant
    weight = torch.nn.Parameter(torch.randn(6, 4))
    basis = _basis(build_optimizer(variant, [weight], 1e-3))
    assert basis == bases.CholeskyQR(every=every, precision="float64", plain_passes=1)
    # the composition's name for the same refresh builds the same part
    composed = parse_variant(f"estimator=kl,basis=cholesky_qr64,plain_passes=1,every={every}")
    assert _basis(build_optimizer(composed, [weight], 1e-3)) == basis
    assert _basis(build_optimizer(parse_variant("kl_shampoo,refresh=qr"), [weight], 1e-3)) == bases.QRPowerStep()


@pytest.mark.parametrize("text, match", [
    ("kl_shampoo,refresh=householder", "bad refresh: got 'householder'; allowed: qr, cholesky_qr64"),
    ("estimator=kl,basis=qr,refresh=cholesky_qr64", "refresh chooses the basis refresh of a preset"),
    ("estimator=kl,basis=cholesky_qr64,refresh=cholesky_qr64", "write basis=cholesky_qr64,plain_passes=1"),
])
def test_the_workbench_refuses_refresh_where_it_means_nothing(text, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(text)


@pytest.mark.parametrize("text, match", [
    ("soap,refresh=cholesky_qr64", "needs an unsorted QR power step"),
    ("shampoo,refresh=cholesky_qr64", "this preset refreshes its basis with Eigh"),
    ("kl_shampoo,basis_power=2,refresh=cholesky_qr64", "with basis_power=2"),
])
def test_the_workbench_passes_the_presets_refusals_on(text, match):
    with pytest.raises(ValueError, match=match):
        build_optimizer(parse_variant(text), [torch.nn.Parameter(torch.randn(6, 4))], 1e-3)


@pytest.mark.gpu
def test_on_cuda_the_float64_refresh_trains_captured_and_overlapped_as_eager():
    """On CUDA the preset keyword's refresh runs its float64 products, factorisations and solves on the device; the
    captured, asynchronous, staggered step (the GPT-2 A/B's configuration without TF32) matches the eager float32
    step with the same refresh to float32 round-off."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    (eager, _), (fast, _) = train_on_cuda(
        lambda: mlp([5, 7, 3]),
        lambda model, **options: precond.kl_shampoo(model.parameters(), lr=1e-2, every=3, stagger=True,
                                                    refresh="cholesky_qr64", on_nonfinite="ignore", **options),
        batches(30, 5, 3), [{}, {"capture": True, "async_refresh": True}])
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-5)
