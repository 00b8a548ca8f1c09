"""``Preconditioner(fold_every=k)``: the estimator folds the gradient of step ``t`` only when ``t mod k = 0``; the
updates use the current bases every step and the refreshes keep their schedule.

The factors are checked against the EMA of ``Gram_k`` over the folded gradients, written here in float64 from the
recorded gradients; the refreshes at steps that do not fold, the captured (emulated) step, the resume, the presets
and workbench keys, and the refusals."""

from __future__ import annotations

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

import small_training as training
from reference import unfold

F64 = torch.float64


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7, bias=False), torch.nn.Tanh(), torch.nn.Linear(7, 3, bias=False))


def _batches(steps: int):
    return training.batches(steps, 5, 3, size=11, seed=2)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("fold_every", [1, 2, 3])
def test_the_factors_are_the_ema_of_the_folded_gradients_only(fold_every):
    beta = 0.8
    model = _model()
    preconditioner = precond.Preconditioner(
        structure=structures.NMode(), estimator=estimators.Shampoo(beta=beta), basis=bases.Eigh(every=2),
        applier=precond.Power(p=0.25, eps=1e-8), fold_every=fold_every)
    opt = precond.Optimizer(model.parameters(), preconditioner=preconditioner, lr=1e-2, momentum=0.9,
                            state_dtype=F64)
    expected: dict[int, list[torch.Tensor]] = {}
    for t, (x, y) in enumerate(_batches(10)):  # t = 0 is the fill; then steps 1, 2, …
        opt.zero_grad()
        _loss(model, x, y).backward()
        for p in model.parameters():
            g = p.grad.double()
            grams = [g @ g.T, g.T @ g]
            if t == 0:
                expected[id(p)] = [(1 - beta) * gram for gram in grams]
            elif t % fold_every == 0:
                expected[id(p)] = [beta * s + (1 - beta) * gram for s, gram in zip(expected[id(p)], grams,
                                                                                   strict=True)]
        opt.step()
        for p in model.parameters():
            factors = opt.state[p]["estimator"]["S"]
            for k, s in enumerate(expected[id(p)]):
                torch.testing.assert_close(factors[str(k)], s, rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple).filter(
           lambda s: sum(d > 1 for d in s) >= 2),  # two modes of size > 1: dense factors (a vector is diagonal)
       fold_every=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_on_weights_of_any_order_each_factor_is_the_ema_of_its_folded_mode_grams(shape, fold_every, seed):
    beta = 0.7
    g = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(shape, generator=g, dtype=F64))
    preconditioner = precond.Preconditioner(
        structure=structures.NMode(), estimator=estimators.Shampoo(beta=beta), basis=bases.Eigh(every=2),
        applier=precond.Power(p=0.25, eps=1e-8), fold_every=fold_every)
    opt = precond.Optimizer([weight], preconditioner=preconditioner, lr=1e-2, momentum=0.9, state_dtype=F64)
    layout = opt.layout(weight)
    expected: dict[int, torch.Tensor] = {}
    for t in range(8):  # t = 0 is the fill
        opt.zero_grad()
        target = torch.randn(shape, generator=g, dtype=F64)
        ((weight - target) ** 3).sum().backward()
        viewed = layout.view(weight.grad.detach())
        for k in range(viewed.ndim):
            gram = unfold(viewed, k) @ unfold(viewed, k).T
            if t == 0:
                expected[k] = (1 - beta) * gram
            elif t % fold_every == 0:
                expected[k] = beta * expected[k] + (1 - beta) * gram
        opt.step()
        factors = opt.state[weight]["estimator"]["S"]
        assert len(factors) >= 2
        for key, factor in factors.items():
            torch.testing.assert_close(factor, expected[int(key)], rtol=1e-12, atol=1e-12)


def test_bases_are_refreshed_on_schedule_at_steps_that_do_not_fold():
    model = _model()
    opt = precond.kl_shampoo(model.parameters(), lr=3e-3, every=2, fold_every=3, stagger=True, state_dtype=F64)
    refreshed_without_fold = 0
    for x, y in _batches(14):
        opt.zero_grad()
        _loss(model, x, y).backward()
        before = {(id(p), k): (q.clone(), opt.state[p]["estimator"]["S"][k].clone())
                  for p in model.parameters() if opt.state[p] for k, q in opt.state[p]["basis"]["Q"].items()}
        opt.step()
        for p in model.parameters():
            step = int(opt.state[p]["step"])
            for k, q in opt.state[p]["basis"]["Q"].items():
                if (id(p), k) not in before:
                    continue
                old_q, old_s = before[(id(p), k)]
                folded = not torch.equal(opt.state[p]["estimator"]["S"][k], old_s)
                assert folded == (step % 3 == 0)
                due = (step + opt.refresh_offset(p, int(k))) % 2 == 0
                if not due:
                    assert torch.equal(q, old_q)
                elif not folded and not torch.equal(q, old_q):
                    refreshed_without_fold += 1
    assert refreshed_without_fold > 0


@pytest.mark.parametrize(("reference", "fast"), [
    ({"stagger": True}, {"stagger": True, "async_refresh": True}),
    ({}, {"capture": "emulate", "on_nonfinite": "ignore"}),
])
def test_the_fast_paths_give_the_eager_updates(reference, fast):
    batches = _batches(12)
    results = []
    for options in (reference, fast):
        model = _model()
        opt = precond.kl_shampoo(model.parameters(), lr=3e-3, every=2, fold_every=2, state_dtype=F64, **options)
        training.train(model, opt, batches)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-12)


def test_a_resumed_run_folds_on_the_same_steps():
    training.assert_resume_is_exact(
        _model, lambda model: precond.kl_shampoo(model.parameters(), lr=3e-3, every=2, fold_every=3, state_dtype=F64),
        _batches(13), 5)


def test_the_keyword_reaches_presets_and_the_workbench_and_bad_values_are_refused():
    assert precond.soap(_model().parameters(), fold_every=4).param_groups[0]["preconditioner"].fold_every == 4
    built = build_optimizer(parse_variant("kl_shampoo,fold_every=2"), _model().parameters(), lr=1e-3)
    assert built.param_groups[0]["preconditioner"].fold_every == 2
    composed = build_optimizer(parse_variant("estimator=kl,fold_every=3"), _model().parameters(), lr=1e-3)
    assert composed.param_groups[0]["preconditioner"].fold_every == 3
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="fold_every"):
            precond.kl_shampoo(_model().parameters(), fold_every=bad)
    with pytest.raises(ValueError, match="fold_every > 1 with an estimator fed by layer captures"):
        precond.Preconditioner(structure=structures.NMode(), estimator=estimators.DenseSpectrum(
            _kfac_estimator()), basis=bases.Eigh(), applier=precond.Power(p=0.5), fold_every=2)


def _kfac_estimator():
    return estimators.KFAC(capture=precond.KFACCapture(_model()))


@pytest.mark.gpu
def test_on_cuda_the_captured_step_with_two_graphs_matches_the_eager_one():
    (eager, _), (captured, _) = training.train_on_cuda(
        _model, lambda model, **options: precond.kl_shampoo(model.parameters(), lr=3e-3, every=2, fold_every=2,
                                                            tf32=False, **options),
        _batches(12), [{}, {"capture": True, "on_nonfinite": "ignore"}])
    torch.testing.assert_close(captured, eager, rtol=0, atol=1e-5)
