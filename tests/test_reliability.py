"""Misuse a new user tried, each refused clearly or survived (the reliability issue's numbered items), plus
``on_nonfinite="skip"`` and adversarial gradient sequences.

Every preset is exercised; each test names the item it closes.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bases
import estimators
import precond
import structures

import trajectory_cases
from strategies import seeds, shapes

PRESETS = trajectory_cases.PRESETS  # the Kronecker-family presets (Muon and K-FAC have their own tests)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _backward(model, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    dtype = next(model.parameters()).dtype
    x = torch.randn(7, 5, generator=gen).to(dtype)
    (model(x).float() ** 2).sum().mul(scale).backward()


def _opt(preset, params, **kw):
    kw.setdefault("lr", 1e-2)
    return getattr(precond, preset)(params, every=2, **kw)


def _state_tensors(opt):
    out = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for state in opt.state.values():
        walk(state)
    return out


def _all_finite(model, opt):
    return all(bool(torch.isfinite(t).all()) for t in list(model.parameters()) + _state_tensors(opt))


# --- item 2: float16 parameters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["eshampoo", "shampoo"])
def test_float16_update_is_scaled_before_the_cast(preset):
    """Item 2: the raw (unscaled) direction of ungrafted Shampoo / eShampoo exceeds float16's range on a (6, 5)
    weight; scaled by a tiny lr in float32 first, the float16 step equals the float32 step rounded to float16."""
    gen = torch.Generator().manual_seed(0)
    w16 = nn.Parameter(torch.randn(6, 5, generator=gen).half())
    w32 = nn.Parameter(w16.detach().float())
    options = {"graft": None} if preset == "shampoo" else {}
    opts = [_opt(preset, [w], lr=1e-9, **options) for w in (w16, w32)]
    for _ in range(4):
        g = torch.randn(6, 5, generator=gen) * 1e-3
        w16.grad, w32.grad = g.half(), g.half().float()
        for opt in opts:
            opt.step()
    assert torch.isfinite(w16).all()
    # both moved by < 1 float16 ulp: w16 must still equal its start rounded (the float32 copy moved by ≤ 1e-3)
    assert (w32.detach() - w16.detach().float()).abs().max() < 1e-2


# --- items 3, 4, 6: hyperparameters checked at construction and at step() -----------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name,value", [("lr", float("nan")), ("lr", float("inf")), ("lr", -1.0), ("lr", "1e-3"),
                                        ("weight_decay", float("inf")), ("weight_decay", float("nan")),
                                        ("momentum", float("nan"))])
def test_bad_hyperparameter_set_after_construction_is_refused_at_step(preset, name, value):
    """Items 3, 4, 6: a value changed in ``param_groups`` after construction is checked when ``step()`` starts,
    before any state or weight is touched."""
    model = _model()
    opt = _opt(preset, model.parameters())
    _backward(model, 0)
    opt.step()
    _backward(model, 1)
    before = [p.detach().clone() for p in model.parameters()], [t.clone() for t in _state_tensors(opt)]
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=name):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before[1], _state_tensors(opt), strict=True))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kwargs", [{"lr": "1e-3"}, {"lr": float("nan")}, {"weight_decay": float("inf")},
                                    {"eps": float("nan")}, {"eps": float("inf")}, {"lr": torch.tensor([1e-3, 1e-3])}])
def test_bad_hyperparameter_is_refused_at_construction(preset, kwargs):
    """Items 4, 5, 6: strings, NaN and inf are refused when the optimizer is built, naming the field."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        _opt(preset, _model().parameters(), **kwargs)


def test_nan_tensor_lr_is_refused_at_step():
    """Item 3 for a tensor lr: its value joins the step's finiteness check (no extra synchronisation)."""
    model = _model()
    opt = precond.kl_shampoo(model.parameters(), lr=torch.tensor(1e-2))
    _backward(model, 0)
    opt.step()
    opt.param_groups[0]["lr"].fill_(float("nan"))
    _backward(model, 1)
    with pytest.raises(FloatingPointError, match="lr of group 0"):
        opt.step()


# --- item 5: every float field of every part rejects NaN/inf -------------------------------------------------------
PARTS = [estimators.KL, estimators.Shampoo, estimators.DenseSpectrum, bases.Eigh, bases.QRPowerStep,
         bases.CholeskyQR, precond.Power, structures.NMode, structures.Kronecker, structures.OneSided]


def _float_fields():
    import attrs

    out = []
    for cls in PARTS:
        for field in attrs.fields(cls):
            if isinstance(field.default, float) or field.name in ("every", "max_dim", "warmup"):
                out.append((cls, field.name))
    out += [(precond.Graft, "beta"), (precond.Graft, "eps"), (precond.Normalize, "rms")]
    return out


@pytest.mark.parametrize("cls,field", _float_fields(), ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_numeric_field_of_every_part_refuses_nan_and_inf(cls, field, value):
    """Item 5: e.g. ``KL(damping=nan)`` or ``Power(eps=nan)`` raise at construction, naming the field."""
    wrapped = {"inner": precond.Power()} if cls in (precond.Graft, precond.Normalize) else {}
    with pytest.raises(ValueError, match=field):
        cls(**wrapped, **{field: value})


# --- item 7: a part of the wrong kind ------------------------------------------------------------------------------
GOOD = dict(structure=structures.NMode(), estimator=estimators.KL(), basis=bases.QRPowerStep(),
            applier=precond.Power())


@pytest.mark.parametrize("slot", list(GOOD))
@pytest.mark.parametrize("wrong", ["kl", None, 3, "estimator-in-wrong-slot", "class"])
def test_part_of_the_wrong_kind_is_refused_at_construction(slot, wrong):
    """Item 7: a string, None, a number, another slot's part or a class (not an instance) is refused when the
    preconditioner is built, naming the slot and what it expects."""
    if wrong == "estimator-in-wrong-slot":
        wrong = estimators.KL() if slot != "estimator" else bases.Eigh()
    elif wrong == "class":
        wrong = type(GOOD[slot])
    with pytest.raises(TypeError, match=f"{slot} must be"):
        precond.Preconditioner(**{**GOOD, slot: wrong})


def test_wrong_part_in_a_param_group_override_is_refused():
    model = _model()
    opt = precond.kl_shampoo([model[0].weight])
    with pytest.raises(TypeError, match="basis must be"):
        opt.add_param_group({"params": [model[2].weight], "basis": estimators.KL()})
    assert len(opt.param_groups) == 1


# --- item 9: huge gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("magnitude", [1e19, 1e30, 3e38])
def test_gradients_up_to_float32_range_leave_parameters_finite(preset, magnitude):
    """Item 9: after ordinary steps, gradients of magnitude ≥ 1e19 overflowed the float32 factors and left NaN
    weights in every preset; now they are scaled down by a power of two first (and counted)."""
    model = _model()
    opt = _opt(preset, model.parameters())
    for i in range(3):
        _backward(model, i)
        opt.step()
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in model.parameters():
            g = torch.randn(p.shape, generator=gen)
            p.grad = g / g.abs().max() * magnitude
        opt.step()
    assert _all_finite(model, opt)
    assert opt.stats()["gradient_rescaled"] >= 1


# --- item 10: deepcopy and pickle -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_exactly_like_the_original(preset, how):
    """Item 10: ``torch.optim.Optimizer.__getstate__`` keeps only defaults/state/param_groups; the options
    (``state_dtype``, ``tf32``, stagger, …) must survive too, and the copy must step bit for bit as the original."""
    model = _model(torch.float64)
    opt = _opt(preset, model.named_parameters(), state_dtype=torch.float64, stagger=True, async_refresh=True)
    for i in range(3):
        _backward(model, i)
        opt.step()
    pair = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    for m, o in ((model, opt), pair):
        for i in range(3, 7):
            _backward(m, i)
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), pair[0].parameters(), strict=True))
    options = ("state_dtype", "on_nonfinite", "stack", "stagger", "async_refresh", "tf32", "capture",
               "overlap_backward")
    assert [getattr(pair[1], name) for name in options] == [getattr(opt, name) for name in options]
    assert pair[1].state_dtype == torch.float64 and pair[1].stagger and pair[1].async_refresh


# --- on_nonfinite="skip" --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_skip_leaves_everything_untouched_and_counts(preset):
    model = _model()
    opt = _opt(preset, model.parameters(), on_nonfinite="skip")
    for i in range(3):
        _backward(model, i)
        opt.step()
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]
    _backward(model, 3)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    after = opt.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(before[1], model.parameters(), strict=True))
    for key, state in before[0]["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after["state"][key][name]), name
    assert opt.stats()["nonfinite_skipped"] == 1
    _backward(model, 4)
    opt.step()  # and training goes on
    assert _all_finite(model, opt)


# --- adversarial gradient sequences ---------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(shape=shapes(min_order=1, max_order=4, max_dim=5), seed=seeds, preset=st.sampled_from(PRESETS),
       sequence=st.lists(st.sampled_from(["normal", "tiny", "huge", "zero", "rank1", "repeat", "max"]),
                         min_size=3, max_size=8))
def test_adversarial_gradient_sequences_keep_parameters_and_state_finite(shape, seed, preset, sequence):
    """Scales 1e-30…1e30 (and float32's largest), zeros, rank-1 and repeated gradients, in any order."""
    gen = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(shape, generator=gen))
    opt = getattr(precond, preset)([weight], lr=1e-2, every=1)
    previous = torch.randn(shape, generator=gen)
    for kind in sequence:
        g = torch.randn(shape, generator=gen)
        if kind == "tiny":
            g = g * 1e-30
        elif kind == "huge":
            g = g * 1e30
        elif kind == "max":
            g = g / g.abs().max() * torch.finfo(torch.float32).max
        elif kind == "zero":
            g = torch.zeros(shape)
        elif kind == "rank1":
            flat = torch.randn(shape[0], generator=gen)
            g = flat.reshape(-1, *([1] * (len(shape) - 1))).expand(shape).clone() if len(shape) > 1 else flat
        elif kind == "repeat":
            g = previous.clone()
        previous = g
        weight.grad = g
        opt.step()
        assert torch.isfinite(weight).all(), kind
        assert all(bool(torch.isfinite(t).all()) for t in _state_tensors(opt)), kind


# --- soak -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["kl_shampoo", "soap", "shampoo"])
def test_soak_ten_thousand_steps_with_nan_batches_and_extreme_phases(preset):
    """10,000 steps of a small model under ``on_nonfinite="skip"``: a NaN batch every 1,000 steps, phases of
    rank-deficient, tiny and huge gradients; the parameters stay finite and the counters are reported."""
    model = _model()
    opt = _opt(preset, model.parameters(), lr=1e-3, on_nonfinite="skip")
    gen = torch.Generator().manual_seed(0)
    x_rank1 = torch.randn(1, 5, generator=gen).expand(7, 5)
    for step in range(10_000):
        phase = (step // 500) % 4
        x = x_rank1 if phase == 1 else torch.randn(7, 5, generator=gen)
        scale = {2: 1e-25, 3: 1e25}.get(phase, 1.0)
        model.zero_grad(set_to_none=True)
        (model(x) ** 2).sum().backward()
        for p in model.parameters():
            p.grad.mul_(scale)
        if step % 1000 == 999:
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
    stats = opt.stats()
    print(preset, stats)
    assert _all_finite(model, opt)
    assert stats["nonfinite_skipped"] == 10
    assert math.isfinite(sum(float(p.sum()) for p in model.parameters()))


def _choice_fields():
    """Every field of a part whose validator is :func:`precond.validators.one_of` (found by trying a bad value)."""
    import attrs

    classes = PARTS + [precond.Graft, precond.Normalize, precond.NewtonSchulz, precond.Preconditioner,
                       precond.DataParallel, estimators.KFAC]
    out = []
    for cls in classes:
        for field in attrs.fields(cls):
            if getattr(field.validator, "__qualname__", "").startswith("one_of."):
                out.append((cls, field.name))
    return out


def test_choice_fields_are_found():
    names = {(cls.__name__, field) for cls, field in _choice_fields()}
    assert {("NMode", "large"), ("Power", "eps_placement"), ("DataParallel", "placement"),
            ("Preconditioner", "order")} <= names, names


@pytest.mark.parametrize("cls,field", _choice_fields(), ids=lambda v: getattr(v, "__name__", v))
def test_every_choice_field_names_the_field_and_its_allowed_values(cls, field):
    """A misspelt option (``NMode(large="blok")``) says which field, every allowed value and what was given; the
    message is a sentence, not attrs' tuple with the attribute's repr."""
    required = {
        precond.Graft: lambda: {"inner": precond.Power()},
        precond.Normalize: lambda: {"inner": precond.Power()},
        precond.Preconditioner: lambda: {"structure": structures.NMode(), "estimator": estimators.KL(),
                                         "basis": bases.Eigh(), "applier": precond.Power()},
        estimators.KFAC: lambda: {"capture": precond.KFACCapture(torch.nn.Linear(2, 2))},
    }
    wrapped = required.get(cls, dict)()
    with pytest.raises(ValueError) as error:
        cls(**wrapped, **{field: "misspelt"})
    message = str(error.value)
    assert message.startswith(f"{field} ") and "must be one of" in message and "'misspelt'" in message
    assert "Attribute(" not in message
