"""precond in other people's code (issue 21): NumPy scalars as hyperparameters, as ``torch.optim`` accepts them, and
``torch.compile`` around ``step()``, for every preset.

The presets are read from the package (``precond.PRESETS`` and ``precond.MODEL_PRESETS``) and their numeric
hyperparameters from their signatures, so a new preset or keyword is covered without editing this file.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
import torch
from torch import nn

import estimators
import precond
from precond.optimizer import COMPILE_REFUSAL
from precond.validators import plain_number

ALL_PRESETS = sorted((*precond.PRESETS, *precond.MODEL_PRESETS))


# --- helpers -------------------------------------------------------------------------------------------------------
def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _build(name: str, model: nn.Module, **kwargs) -> precond.Optimizer:
    factory = getattr(precond, name)
    return factory(model, **kwargs) if name in precond.MODEL_PRESETS else factory(model.parameters(), **kwargs)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        x, y = torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _numpy_like(value):
    """``value`` with every number made a NumPy scalar (``np.int64`` for an int, ``np.float32`` for a float, whose
    rounding makes the value differ from the Python float written in the signature), or None if it holds none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return np.int64(value)
    if isinstance(value, float):
        return np.float32(value)
    if isinstance(value, tuple) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
        return tuple(_numpy_like(v) for v in value)
    return None


def _numpy_hyperparameters(name: str) -> dict:
    """Every numeric keyword of preset ``name`` (its signature's defaults), as NumPy scalars; refresh periods 2 so
    that the steps below refresh."""
    chosen = {}
    for parameter in inspect.signature(getattr(precond, name)).parameters.values():
        default = {"every": 2, "factor_every": 2}.get(parameter.name, parameter.default)
        value = _numpy_like(default)
        if value is not None:
            chosen[parameter.name] = value
    return chosen


def _plain(value):
    return tuple(map(plain_number, value)) if isinstance(value, tuple) else plain_number(value)


def _assert_no_numpy(obj, where: str) -> None:
    if isinstance(obj, dict):
        for key, item in obj.items():
            _assert_no_numpy(item, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _assert_no_numpy(item, f"{where}[{i}]")
    else:
        assert not isinstance(obj, np.generic), f"{where} is a NumPy {type(obj).__name__}"


# --- NumPy scalars -------------------------------------------------------------------------------------------------
def test_torch_optim_accepts_numpy_scalars():
    """The reference: ``torch.optim.AdamW`` takes NumPy scalars for ``lr``, ``eps`` and ``weight_decay``."""
    p = nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=np.float32(1e-3), eps=np.float32(1e-8), weight_decay=np.int64(0))
    p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_numpy_scalar_hyperparameters_step_as_the_python_numbers_of_the_same_value(name):
    """Every numeric keyword of every preset given as a NumPy scalar (``lr=np.float32(1e-3)``,
    ``betas=(np.float32(0.9), …)``, ``every=np.int64(2)``, …) is accepted, and the run (refreshes included) is
    bit-identical to the run given the Python numbers of the same values; the groups, the parts and the state dict
    hold Python numbers, so the checkpoint loads with ``weights_only=True`` and resumes the same run."""
    numpy_kwargs = _numpy_hyperparameters(name)
    assert {"lr"} <= numpy_kwargs.keys()
    python_kwargs = {key: _plain(value) for key, value in numpy_kwargs.items()}
    model, twin = _model(), _model()
    opt, twin_opt = _build(name, model, **numpy_kwargs), _build(name, twin, **python_kwargs)
    _train(model, opt, range(5))
    _train(twin, twin_opt, range(5))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == python_kwargs["lr"] and type(opt.param_groups[0]["lr"]) is float
    for group in opt.param_groups:
        _assert_no_numpy({k: v for k, v in group.items() if k != "params"}, "param group")
    saved = opt.state_dict()
    _assert_no_numpy(saved["param_groups"], "state_dict()['param_groups']")
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    resumed_model = _model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = _build(name, resumed_model, **numpy_kwargs)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _train(resumed_model, resumed, range(5, 8))
    _train(twin, twin_opt, range(5, 8))
    for p, q in zip(resumed_model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_numpy_scalars_in_added_groups_and_set_between_steps_step_as_python_numbers():
    """A group added with NumPy hyperparameters, and an ``lr`` a schedule sets to a NumPy scalar between steps
    (``base * np.cos(...)`` gives ``np.float64``, ``np.float32`` arithmetic another type), step as the same Python
    numbers: the group holds Python numbers again after the step."""
    runs = []
    for number in (np.float32, lambda v: float(np.float32(v))):
        model = _model()
        opt = precond.KLShampoo(model[0].parameters(), lr=1e-2, every=2)
        opt.add_param_group({"params": model[2].parameters(), "lr": number(3e-2), "momentum": number(0.5),
                             "weight_decay": number(0.1)})
        _train(model, opt, range(2))
        opt.param_groups[0]["lr"] = number(5e-3)
        _train(model, opt, range(2, 4))
        assert all(type(g[key]) is float for g in opt.param_groups for key in ("lr", "momentum", "weight_decay"))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_numpy_scalars_are_stored_as_python_numbers_by_the_parts():
    """A part built with NumPy scalars holds the Python numbers of the same values (its equality, its ``repr`` and
    its checkpoint description are those of the plain configuration)."""
    kl = estimators.KL(beta=np.float32(0.95), init_lambda=np.float64(0.1), damping=np.int64(0))
    assert kl == estimators.KL(beta=float(np.float32(0.95)), init_lambda=0.1, damping=0)
    assert (type(kl.beta), type(kl.init_lambda), type(kl.damping)) == (float, float, int)
    power = precond.Power(p=np.float32(0.5), eps=np.float32(1e-8))
    assert type(power.p) is float and type(power.eps) is float


@pytest.mark.parametrize("call, words", [
    (lambda p: precond.KLShampoo([p], lr=np.array(1e-3)), "lr must be a number"),
    (lambda p: precond.KLShampoo([p], lr=np.array([1e-3])), "lr must be a number"),
    (lambda p: precond.KLShampoo([p], betas=(np.True_, 0.95)), "momentum"),
    (lambda p: precond.KLShampoo([p], every=np.float64(2.0)), "integer"),
    (lambda p: precond.KLShampoo([p], betas=(0.9, np.float32("nan"))), "beta"),
], ids=["0-d array", "1-d array", "numpy bool", "float period", "nan"])
def test_what_numpy_values_are_still_refused(call, words):
    """NumPy booleans and arrays stay refused (``torch.optim``'s arithmetic refuses arrays too), as do a float where
    an integer is needed and NaN."""
    with pytest.raises(ValueError, match=words):
        call(nn.Parameter(torch.randn(3, 4)))


# --- torch.compile -------------------------------------------------------------------------------------------------
def _one_backward(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen)
    nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("fullgraph", [False, True], ids=["graph breaks", "fullgraph"])
@pytest.mark.parametrize("name", ALL_PRESETS)
def test_compiling_the_step_is_refused_with_one_message_that_points_to_capture(name, fullgraph):
    """``torch.compile(optimizer.step)()`` raises ``precond.optimizer.COMPILE_REFUSAL`` (which names
    ``capture=True``) for every preset, before anything moves; TorchDynamo neither swallows it (a plain ``raise``
    would become a graph break and run eagerly) nor buries it (it failed in ``precond.state`` or an attrs
    ``__init__`` before). The same step then runs eagerly."""
    model = _model()
    opt = _build(name, model)
    before = [p.detach().clone() for p in model.parameters()]
    _one_backward(model, 0)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError) as raised:
        torch.compile(opt.step, backend="eager", fullgraph=fullgraph)()
    assert str(raised.value).splitlines()[0] == COMPILE_REFUSAL and "capture=True" in COMPILE_REFUSAL
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not any(opt.state.values())
    opt.step()
    assert all(opt.state[p] for p in model.parameters())  # the eager step (a preset may only fill at first)


@pytest.mark.parametrize("name", ALL_PRESETS)
def test_a_compiled_model_and_a_compiled_training_step_with_an_eager_optimizer_step_train_as_eager(name):
    """What the refusal recommends works: ``torch.compile(model)`` with ``optimizer.step()`` outside it (every
    preset), and a compiled training function that calls ``torch.compiler.disable(optimizer.step)()`` (a preset of
    each kind: K-FAC's module hooks, a factored preset, Muon's two parts), give the eager run bit for bit
    (``aot_eager``: TorchDynamo and AOTAutograd without Inductor's reordered arithmetic). K-FAC's layer hooks run
    eagerly inside the compiled model (they failed in an attrs ``__init__`` before)."""
    runs = []
    ways = ("eager", "compiled model", "compiled training step") if name in ("kfac", "kl_shampoo", "muon") else (
        "eager", "compiled model")  # the training step's optimizer step is eager: one preset per kind of hooks
    for how in ways:
        torch._dynamo.reset()
        model = _model()
        opt = _build(name, model)
        forward = torch.compile(model, backend="aot_eager") if how == "compiled model" else model

        def train(step: int, forward=forward, opt=opt) -> None:
            _one_backward(forward, step)
            torch.compiler.disable(opt.step)()

        step_fn = torch.compile(train, backend="aot_eager") if how == "compiled training step" else None
        for step in range(4):
            opt.zero_grad(set_to_none=True)
            if step_fn is not None:
                step_fn(step)
            else:
                _one_backward(forward, step)
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for run in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0], run, strict=True))
