"""``refresh_budget=B``: each ``step()`` refreshes the due bases that drifted (``r ≥ τ``) in decreasing ``r``, while
their ``d³`` fits in ``W = Σ d³ / B`` (the most drifted always).

The refreshed sets are checked against a greedy selection written here from dense float64 ``r`` of the state before
each step; the cap, the trivial budget (``B = 1`` grants every drifted basis, so it is the plain drift schedule bit
for bit), the resume and the refusals."""

from __future__ import annotations

import pytest
import torch

import precond

import small_training as training

F64 = torch.float64


def _model(seed: int = 0) -> torch.nn.Module:
    return training.mlp([6, 12, 9, 5], seed)


def _batches(steps: int):
    return training.batches(steps, 6, 5)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def _build(model, every=2, tolerance=0.1, budget=4, **options):
    return precond.kl_shampoo(model.parameters(), lr=3e-3, every=every, state_dtype=F64, drift_tolerance=tolerance,
                              refresh_budget=budget, stagger=True, **options)


def _units(opt):
    """``{(id(p), k): (Q_k, S_k)}`` of every refreshed mode, views of the state, in parameter order."""
    out = {}
    for p in (p for group in opt.param_groups for p in group["params"]):
        state = opt.state[p]
        for key, q in state.get("basis", {}).get("Q", {}).items():
            out[(id(p), int(key))] = (q, state["estimator"]["S"][key])
    return out


def _dense_ratio(s: torch.Tensor, q: torch.Tensor) -> float:
    a = q.mT @ s @ q
    off = a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
    return (torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(a)).item()


@pytest.mark.parametrize("options", [{}, {"track_drift": True}])
@pytest.mark.parametrize("budget", [3, 8])
def test_each_step_refreshes_the_most_drifted_due_bases_that_fit_the_budget(budget, options):
    model = _model()
    opt = _build(model, budget=budget, **options)
    every, tolerance = 2, 0.1
    params = {id(p): p for p in model.parameters()}
    deferred = refreshed = 0
    compared = 0
    for x, y in _batches(40):
        opt.zero_grad()
        _loss(model, x, y).backward()
        units = _units(opt)
        before = {key: (q.clone(), _dense_ratio(s, q)) for key, (q, s) in units.items()}
        work = {key: q.shape[-1] ** 3 for key, (q, _) in units.items()}
        opt.step()
        if not before:
            continue
        allowance = sum(work.values()) / budget
        due = [key for key in before
               if (int(opt.state[params[key[0]]]["step"]) + opt.refresh_offset(params[key[0]], key[1])) % every == 0]
        ratios = sorted(before[key][1] for key in due)
        gaps = [b - a for a, b in zip(ratios, ratios[1:], strict=False)]
        if any(abs(r - tolerance) < 1e-9 for r in ratios) or any(gap < 1e-9 for gap in gaps):
            continue  # a tie: either choice is right
        drifted = sorted((key for key in due if before[key][1] >= tolerance), key=lambda key: -before[key][1])
        expected, spent = set(), 0
        for key in drifted:  # the greedy of the docstring, written again
            if not expected or spent + work[key] <= allowance:
                expected.add(key)
                spent += work[key]
        changed = {key for key, (q, _) in _units(opt).items() if not torch.equal(q, before[key][0])}
        assert changed == expected
        assert sum(work[key] for key in changed) <= max(allowance, max(work.values()))
        deferred += len(drifted) - len(expected)
        refreshed += len(expected)
        compared += 1
    assert compared >= 30 and deferred > 0 and refreshed > 0  # the budget bound and both decisions were exercised
    assert opt.stats()["drift_deferred"] >= deferred
    per_unit = [c for modes in opt.refresh_counts().values() for c in modes.values()]
    assert sum(c["deferred"] for c in per_unit) == opt.stats()["drift_deferred"]
    assert all(c["refreshes"] + c["deferred"] <= c["checks"] for c in per_unit)


@pytest.mark.parametrize(("reference", "other"), [
    ({"budget": None}, {"budget": 1}),  # B = 1: W is all the work, every drifted basis is granted
    ({"budget": 4}, {"budget": 4, "async_refresh": True}),  # on side streams: the same grants and updates
    ({"budget": 4}, {"budget": 4, "capture": "emulate", "on_nonfinite": "ignore"}),
])
def test_the_same_grants_and_updates_bit_for_bit(reference, other):
    batches = _batches(24)
    runs = []
    for options in (reference, other):
        model = _model()
        opt = _build(model, **options)
        training.train(model, opt, batches)
        runs.append((model, opt))
    (free, opt_free), (capped, opt_capped) = runs
    assert opt_capped.refresh_counts() == opt_free.refresh_counts()
    assert opt_capped.stats()["drift_deferred"] == opt_free.stats()["drift_deferred"]
    assert opt_capped.stats()["drift_refreshes"] < opt_capped.stats()["drift_checks"]
    for a, b in zip(free.parameters(), capped.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_resumed_budgeted_run_makes_the_same_grants_as_an_uninterrupted_one():
    opt_whole, _ = training.assert_resume_is_exact(_model, lambda model: _build(model, budget=5, track_drift=True),
                                                   _batches(20), 9)
    assert opt_whole.stats()["drift_deferred"] > 0


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "10"])
def test_a_bad_budget_is_refused_with_what_to_pass(bad):
    with pytest.raises(ValueError, match="refresh_budget must be None .* a positive integer"):
        _build(_model(), budget=bad)


def test_a_budget_without_drift_tolerance_is_refused_with_the_remedy():
    with pytest.raises(ValueError, match="refresh_budget ranks the due bases by their drift.*drift_tolerance=0.0"):
        precond.kl_shampoo(_model().parameters(), refresh_budget=10)


def test_a_parameter_added_mid_run_is_stepped_under_the_budget():
    model = _model()
    extra = torch.nn.Linear(5, 4)
    opt = _build(model, budget=6, track_drift=True)
    batches = _batches(16)
    for i, (x, y) in enumerate(batches):
        if i == 6:
            opt.add_param_group({"params": extra.parameters()})
        opt.zero_grad()
        out = model(x)
        loss = _loss(model, x, y) + (extra(out).square().mean() if i >= 6 else 0.0)
        loss.backward()
        opt.step()
    counts = opt.refresh_counts()
    assert any(c["checks"] > 0 for c in counts["of shape (4, 5)"].values())
    assert sum(c["deferred"] for modes in counts.values() for c in modes.values()) == opt.stats()["drift_deferred"]


@pytest.mark.gpu
def test_on_cuda_the_captured_asynchronous_budgeted_step_matches_the_eager_one():
    (eager, eager_opt), (fast, fast_opt) = training.train_on_cuda(
        _model, lambda model, **options: precond.kl_shampoo(model.parameters(), lr=3e-3, every=2,
                                                            drift_tolerance=0.1, refresh_budget=4, stagger=True,
                                                            track_drift=True, tf32=False, **options),
        _batches(24), [{}, {"async_refresh": True, "capture": True, "on_nonfinite": "ignore"}])
    eager_stats, fast_stats = eager_opt.stats(), fast_opt.stats()
    assert eager_stats["drift_checks"] == fast_stats["drift_checks"]
    assert fast_stats["drift_deferred"] > 0
    torch.testing.assert_close(fast, eager, rtol=0, atol=5e-3)
