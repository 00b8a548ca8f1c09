"""The workbench's speed keys (``stagger``, ``async_refresh``, ``capture``, ``tf32``) and KL's ``init_lambda``.

Each key must reach the optimizer it names, leave the identity of variants that do not give it unchanged (the
committed records are keyed by it), and be refused, with the reason, where it does not belong.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import bases
from precond.ablate import keys
from precond.ablate.variants import parse_variant


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _train(text: str, steps: int = 12) -> list[torch.Tensor]:
    model = _model()
    optimizer = parse_variant(text).build(model.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        x = torch.randn(7, 6, generator=generator)
        model(x).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("text", ["kl_shampoo", "estimator=kl,basis=refine", "soap"])
def test_speed_keys_reach_the_optimizer(text: str) -> None:
    fast = parse_variant(f"{text},stagger=true,async_refresh=true,capture=true,tf32=false")
    optimizer = fast.build(_model().parameters(), lr=1e-3)
    assert optimizer.stagger and optimizer.async_refresh
    assert optimizer.tf32 is False
    assert optimizer.engine.options["capture"] is True
    plain = parse_variant(text).build(_model().parameters(), lr=1e-3)
    assert not plain.stagger and not plain.async_refresh and plain.tf32 is None
    assert plain.engine.options["capture"] is False


def test_keys_that_promise_the_same_updates_keep_them_bitwise() -> None:
    """``async_refresh`` and ``capture`` change how a step runs, not what it computes (on the CPU the captured body
    runs eagerly with its static buffers)."""
    reference = _train("kl_shampoo")
    for options in ("async_refresh=true", "capture=true", "async_refresh=true,capture=true"):
        text = f"kl_shampoo,{options}"
        for expected, got in zip(reference, _train(text), strict=True):
            assert torch.equal(expected, got), text


def test_variants_without_the_new_keys_keep_their_identity() -> None:
    """A composition's settings list the keys of its defaults and the given ones: none of the new keys appear
    unless given, so records made before them still match."""
    for text in ("kl_shampoo", "estimator=kl,basis=qr", "soap,every=32"):
        spec = parse_variant(text).spec()
        assert not any(f"{key}=" in spec for key in (*keys.SPEED_KEYS, "init_lambda")), spec
    assert parse_variant("kl_shampoo").spec() == "kl_shampoo"


def test_init_lambda_from_data_is_the_spectrum_of_the_first_factor() -> None:
    """``init_lambda=data``: after the fill, λ_k is the eigenvalues of the filled S_k (float64 ``eigh``), raised to
    the prototype's floor ``max(10, d)^{-2}``; the default keeps λ₀ = 0.1."""
    model = torch.nn.Linear(8, 4, bias=False)
    optimizer = parse_variant("estimator=kl,init_lambda=data").build(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8, generator=torch.Generator().manual_seed(2))).sum().backward()
    optimizer.step()
    state = optimizer.state[model.weight]["estimator"]
    for mode, d in (("0", 4), ("1", 8)):
        eigenvalues = torch.linalg.eigvalsh(state["S"][mode].double()).flip(0)
        expected = eigenvalues.clamp_min(max(10, d) ** -2)
        torch.testing.assert_close(state["lambda"][mode].double().sort(descending=True).values, expected,
                                   rtol=1e-5, atol=1e-7)
    default = parse_variant("estimator=kl").build(copy.deepcopy(model).parameters(), lr=1e-3)
    assert default.param_groups[0]["preconditioner"].estimator.init_lambda == 0.1
    chosen = parse_variant("estimator=kl_soap,init_lambda=0.5").build(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    assert chosen.param_groups[0]["preconditioner"].estimator.factors.init_lambda == 0.5


@pytest.mark.parametrize(("text", "says"), [
    ("estimator=shampoo,init_lambda=0.1", "belongs to estimator kl or kl_soap"),
    ("kl_shampoo,init_lambda=0.1", "cannot be changed on the named variant"),
    ("estimator=kl,init_lambda=-1", "expected a number > 0"),
    ("kl_shampoo,capture=maybe", "expected true or false"),
    ("muon,stagger=true", "stagger"),
    ("estimator=kl,basis=qr,sweeps=1", "sweeps is the number of refinement sweeps .* belongs to basis refine"),
    ("kl_shampoo,sweeps=3", "cannot be changed on the named variant"),
    ("basis=refine,sweeps=0", "sweeps"),
    ("basis=cholesky_qr,plain_passes=1", "plain_passes is the number of plain Cholesky-QR passes .* belongs to basis "
                                         "cholesky_qr64"),
])
def test_misplaced_keys_are_refused_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_variant(text)


@pytest.mark.parametrize("text", ["kl_shampoo", "estimator=kl,basis=qr", "soap"])
def test_drift_tolerance_reaches_the_optimizer_and_zero_keeps_the_fixed_schedule(text: str) -> None:
    optimizer = parse_variant(f"{text},drift_tolerance=0.2").build(_model().parameters(), lr=1e-3)
    assert optimizer.engine.drift is not None and optimizer.engine.drift.tolerance == 0.2
    assert parse_variant(text).build(_model().parameters(), lr=1e-3).engine.drift is None
    for expected, got in zip(_train(text), _train(f"{text},drift_tolerance=0"), strict=True):
        assert torch.equal(expected, got), text


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "yes"])
def test_a_bad_drift_tolerance_is_refused_by_the_workbench(bad: str) -> None:
    with pytest.raises(ValueError, match="drift_tolerance"):
        parse_variant(f"kl_shampoo,drift_tolerance={bad}")


class _Regression:
    """A 6 → 3 regression through the two-layer ``_model``, for :func:`train_run`."""

    name = "regression"

    def settings(self):
        return {"task": self.name}

    def build_model(self, seed):
        return _model()

    def load(self, device):
        return self

    def train_batch(self, generator):
        x = torch.randn(7, 6, generator=generator)
        return x, torch.sin(x[:, :3])

    def val_batches(self, count):
        generator = torch.Generator().manual_seed(123)
        return [self.train_batch(generator) for _ in range(count)]

    def loss(self, model, batch):
        x, y = batch
        return (model(x) - y).square().mean()


@pytest.mark.parametrize("tolerance", [0.0, 0.3])
def test_a_run_with_drift_tolerance_records_its_refreshes_per_parameter(tolerance: float) -> None:
    """Every due refresh of a weight's two modes is checked (those due after steps 10 and 20 with T = 10, decided
    at the start of the step after: two per mode in 25 steps); with
    τ = 0 every check refreshes, with τ > 0 at most that many. Other optimizers record nothing."""
    from precond.ablate.train import Training, train_run

    task = _Regression()
    training = Training(steps=25, eval_every=5, eval_batches=1, warmup=0.0, schedule="constant")
    record = train_run(task, task, parse_variant(f"kl_shampoo,drift_tolerance={tolerance}"), 1e-2, 0, training,
                       torch.device("cpu"))
    refreshes = record["refreshes"]
    weights = {name: modes for name, modes in refreshes.items() if set(modes) == {"0", "1"}}
    assert len(weights) == 2, refreshes
    for modes in weights.values():
        for count in modes.values():
            assert count["checks"] == 2
            assert count["refreshes"] == 2 if tolerance == 0 else 0 <= count["refreshes"] <= 2
    plain = train_run(task, task, parse_variant("adamw"), 1e-2, 0, training, torch.device("cpu"))
    assert "refreshes" not in plain


def test_a_run_records_the_fallbacks_its_optimizer_took() -> None:
    """A ``precond`` optimizer's record carries ``optimizer.stats()`` at the end of the run (here Refine's count of
    refreshes that kept the old basis, an integer); AdamW's record has no such entry."""
    from precond.ablate.train import Training, train_run

    task = _Regression()
    training = Training(steps=25, eval_every=5, eval_batches=1, warmup=0.0, schedule="constant")
    record = train_run(task, task, parse_variant("estimator=kl,basis=refine"), 1e-2, 0, training, torch.device("cpu"))
    fallbacks = record["fallbacks"]
    assert "refine_kept_old_basis" in fallbacks
    assert all(isinstance(count, int) and count >= 0 for count in fallbacks.values())
    json.dumps(record)  # the record is written as one JSON line
    plain = train_run(task, task, parse_variant("adamw"), 1e-2, 0, training, torch.device("cpu"))
    assert "fallbacks" not in plain


def test_sweeps_reach_refine_and_stay_out_of_variants_without_them() -> None:
    weight = torch.nn.Linear(5, 3).weight
    basis = parse_variant("basis=refine,sweeps=1").build([weight], lr=1e-3).param_groups[0]["preconditioner"].basis
    assert isinstance(basis, bases.Refine) and basis.sweeps == 1
    default = parse_variant("basis=refine").build([weight], lr=1e-3).param_groups[0]["preconditioner"].basis
    assert default.sweeps == bases.Refine().sweeps and "sweeps" not in parse_variant("basis=refine").spec()


def test_plain_passes_reach_the_float64_refresh_and_stay_out_of_variants_without_them() -> None:
    weight = torch.nn.Linear(5, 3).weight

    def basis_of(text: str):
        return parse_variant(text).build([weight], lr=1e-3).param_groups[0]["preconditioner"].basis

    lean = basis_of("basis=cholesky_qr64,plain_passes=1")
    assert isinstance(lean, bases.CholeskyQR) and (lean.precision, lean.plain_passes) == ("float64", 1)
    default = basis_of("basis=cholesky_qr64")
    assert default.plain_passes == bases.CholeskyQR().plain_passes == 2
    assert "plain_passes" not in parse_variant("basis=cholesky_qr64").spec()
    with pytest.raises(ValueError, match="plain_passes .* must be one of 1, 2, got 3"):
        basis_of("basis=cholesky_qr64,plain_passes=3")
