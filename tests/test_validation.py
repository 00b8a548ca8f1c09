"""Property 7 (docs/design.md): bad input gives a clear error, and a refused step leaves every bit of state as it was.

- a NaN/±Inf gradient makes ``step()`` raise ``FloatingPointError`` (naming the parameter when the optimizer
  was given ``named_parameters()``), before any parameter or any optimizer state is touched;
- complex and sparse gradients / complex parameters are refused with errors that say so;
- invalid hyperparameters raise ``ValueError`` naming the field;
- a parameter without a gradient is skipped and gets no state.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bases
import estimators
import precond
import structures

seeds = st.integers(0, 2**31 - 1)


# --- helpers -------------------------------------------------------------------------------------------------------
def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def make_optimizer(kind: str, params, **kwargs):
    if kind == "kl_shampoo":
        return precond.kl_shampoo(params, lr=1e-2, every=2, **kwargs)
    return precond.shampoo(params, lr=1e-2, every=2, weight_decay=1e-2, **kwargs)


def backward(model: nn.Module, gen: torch.Generator) -> None:
    model.zero_grad(set_to_none=True)
    x = torch.randn(5, 3, generator=gen)
    (model(x) ** 2).sum().backward()


def flatten(value, prefix=""):
    """Nested dicts/lists of tensors → ``{path: leaf}``."""
    out = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}/{i}"))
    else:
        out[prefix] = value
    return out


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    return (
        {name: p.detach().clone() for name, p in model.named_parameters()},
        copy.deepcopy(opt.state_dict()),
    )


def assert_bitwise_equal(before, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    params_before, sd_before = before
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), params_before[name]), f"parameter {name} changed"
    sd_now = opt.state_dict()
    flat_before, flat_now = flatten(sd_before["state"]), flatten(sd_now["state"])
    assert flat_before.keys() == flat_now.keys(), "the set of optimizer state entries changed"
    for key, old in flat_before.items():
        new = flat_now[key]
        if isinstance(old, torch.Tensor):
            assert isinstance(new, torch.Tensor) and old.dtype == new.dtype and torch.equal(old, new), (
                f"state {key} changed"
            )
        else:
            assert old == new, f"state {key} changed"
    assert flatten(sd_before["param_groups"]) == flatten(sd_now["param_groups"])


# --- (a) non-finite gradients ------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["kl_shampoo", "shampoo"]),
    good_steps=st.integers(0, 4),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    which=st.integers(0, 3),
    seed=seeds,
    data=st.data(),
)
def test_nonfinite_gradient_is_refused_and_changes_nothing(kind, good_steps, bad, which, seed, data):
    gen = torch.Generator().manual_seed(seed)
    model = make_model(seed)
    opt = make_optimizer(kind, model.parameters())
    for _ in range(good_steps):
        backward(model, gen)
        opt.step()
    backward(model, gen)
    param = list(model.parameters())[which]
    index = data.draw(st.integers(0, param.numel() - 1))
    param.grad.view(-1)[index] = bad
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"(?i)non-finite|nan|inf") as info:
        opt.step()
    assert "NaN" in str(info.value) or "Inf" in str(info.value)
    assert_bitwise_equal(before, model, opt)
    if good_steps == 0:
        assert len(opt.state) == 0
    # the optimizer keeps working afterwards
    for _ in range(3):
        backward(model, gen)
        opt.step()
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n].detach(), before[0][n]) for n in after), (
        "good steps after a refusal did nothing"
    )
    for key, value in flatten(opt.state_dict()["state"]).items():
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("kind", ["kl_shampoo", "shampoo"])
def test_nonfinite_closure_gradient_is_refused(kind):
    gen = torch.Generator().manual_seed(0)
    model = make_model(0)
    opt = make_optimizer(kind, model.parameters())
    for _ in range(2):
        backward(model, gen)
        opt.step()
    before = snapshot(model, opt)

    def closure():
        backward(model, gen)
        model[0].bias.grad[0] = math.nan
        return torch.tensor(1.0)

    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert_bitwise_equal(before, model, opt)


# --- (b) complex and (c) sparse --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl_shampoo", "shampoo"])
def test_complex_gradient_is_refused(kind):
    gen = torch.Generator().manual_seed(1)
    model = make_model(1)
    opt = make_optimizer(kind, model.parameters())
    backward(model, gen)
    opt.step()
    backward(model, gen)
    weight = model[2].weight
    weight.grad_dtype = None  # allow a gradient of another dtype on this real parameter
    weight.grad = torch.complex(weight.grad, torch.zeros_like(weight.grad))
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()
    assert_bitwise_equal(before, model, opt)


@pytest.mark.parametrize("kind", ["kl_shampoo", "shampoo"])
def test_complex_parameter_is_refused_at_construction(kind):
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))]
    with pytest.raises(TypeError, match="complex"):
        make_optimizer(kind, params)
    named = [("real", params[0]), ("the_complex_one", params[1])]
    with pytest.raises(TypeError, match="the_complex_one"):
        make_optimizer(kind, named)


@pytest.mark.parametrize("kind", ["kl_shampoo", "shampoo"])
def test_sparse_gradient_is_refused(kind):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = make_optimizer(kind, emb.parameters())
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)
    assert len(opt.state) == 0


# --- (d) hyperparameters ----------------------------------------------------------------------------------------------
def _params():
    return [nn.Parameter(torch.zeros(2, 3))]


def _pc(**overrides):
    parts = dict(
        structure=structures.NMode(), estimator=estimators.KL(), basis=bases.QRPowerStep(), applier=precond.Power()
    )
    parts.update(overrides)
    return precond.Preconditioner(**parts)


BAD_CONFIGS = {
    "lr negative": (lambda: precond.kl_shampoo(_params(), lr=-1), r"\blr\b"),
    "lr nan": (lambda: precond.kl_shampoo(_params(), lr=float("nan")), r"\blr\b"),
    "lr inf": (lambda: precond.shampoo(_params(), lr=float("inf")), r"\blr\b"),
    "lr negative tensor": (lambda: precond.kl_shampoo(_params(), lr=torch.tensor(-1.0)), r"\blr\b"),
    "momentum 1": (lambda: precond.kl_shampoo(_params(), lr=1e-2, betas=(1.0, 0.95)), "momentum"),
    "momentum negative": (lambda: precond.kl_shampoo(_params(), lr=1e-2, betas=(-0.1, 0.95)), "momentum"),
    "shampoo momentum 1": (lambda: precond.shampoo(_params(), lr=1e-2, betas=(1.0, 0.95)), "momentum"),
    "beta2 > 1": (lambda: precond.kl_shampoo(_params(), lr=1e-2, betas=(0.9, 1.5)), "beta"),
    "weight decay negative": (lambda: precond.kl_shampoo(_params(), lr=1e-2, weight_decay=-1), "weight_decay"),
    "shampoo weight decay negative": (lambda: precond.shampoo(_params(), lr=1e-2, weight_decay=-1), "weight_decay"),
    "nesterov without momentum": (lambda: precond.shampoo(_params(), betas=(0.0, 0.95), nesterov=True), "nesterov"),
    "decay_order": (lambda: precond.shampoo(_params(), lr=1e-2, decay_order="sideways"), "decay_order"),
    "on_nonfinite": (lambda: precond.shampoo(_params(), on_nonfinite="warn"), "on_nonfinite"),
    "state_dtype": (lambda: precond.shampoo(_params(), state_dtype=torch.float16), "state_dtype"),
    "every 0 preset": (lambda: precond.kl_shampoo(_params(), every=0), "every"),
    "max_dim 0 preset": (lambda: precond.shampoo(_params(), max_dim=0), "max_dim"),
    "Power p 1.5": (lambda: precond.Power(p=1.5), r"^p\b"),
    "Power p -0.1": (lambda: precond.Power(p=-0.1), r"^p\b"),
    "Power p string": (lambda: precond.Power(p="1/N"), r"^p\b"),
    "Power eps -1": (lambda: precond.Power(eps=-1), "eps"),
    "Power eps_placement": (lambda: precond.Power(eps_placement="inside"), "eps_placement"),
    "shampoo preset p": (lambda: precond.shampoo(_params(), p=2.0), r"^p\b"),
    "KL beta 1.5": (lambda: estimators.KL(beta=1.5), "beta"),
    "KL beta -0.1": (lambda: estimators.KL(beta=-0.1), "beta"),
    "KL init_lambda 0": (lambda: estimators.KL(init_lambda=0), "init_lambda"),
    "KL init_lambda -1": (lambda: estimators.KL(init_lambda=-1.0), "init_lambda"),
    "KL damping -1": (lambda: estimators.KL(damping=-1), "damping"),
    "KL floor -1": (lambda: estimators.KL(floor=-1), "floor"),
    "KL refresh_spectrum": (lambda: estimators.KL(refresh_spectrum="drop"), "refresh_spectrum"),
    "Shampoo beta -0.1": (lambda: estimators.Shampoo(beta=-0.1), "beta"),
    "Shampoo spectrum": (lambda: estimators.Shampoo(spectrum="never"), "spectrum"),
    "Eigh every 0": (lambda: bases.Eigh(every=0), "every"),
    "QRPowerStep every -1": (lambda: bases.QRPowerStep(every=-1), "every"),
    "first_step": (lambda: _pc(first_step="skip"), "first_step"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_configuration_raises_value_error_naming_the_field(name):
    build, field = BAD_CONFIGS[name]
    with pytest.raises(ValueError, match=field):
        build()


def test_preconditioner_must_be_a_preconditioner():
    with pytest.raises(TypeError, match="preconditioner"):
        precond.Optimizer(_params(), preconditioner=object())


@pytest.mark.parametrize("group", [{"lr": -1.0}, {"betas": None, "momentum": 1.0}, {"weight_decay": -0.5},
                                   {"decay_order": "sideways"}])
def test_bad_param_group_at_construction_raises(group):
    group = {k: v for k, v in group.items() if k != "betas"}
    with pytest.raises(ValueError):
        precond.kl_shampoo([{"params": _params(), **group}], lr=1e-2)


@pytest.mark.parametrize("group, error", [({"lr": -1.0}, ValueError), ({"momentum": 1.5}, ValueError),
                                          ({"weight_decay": -1.0}, ValueError)])
def test_refused_add_param_group_leaves_the_optimizer_unchanged(group, error):
    model = make_model(2)
    opt = precond.kl_shampoo(model.parameters(), lr=1e-2)
    groups_before = len(opt.param_groups)
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(error):
        opt.add_param_group({"params": [extra], **group})
    assert len(opt.param_groups) == groups_before, "a refused param group was still added"
    assert all(all(q is not extra for q in g["params"]) for g in opt.param_groups)


def test_refused_complex_param_group_leaves_the_optimizer_unchanged():
    model = make_model(3)
    opt = precond.kl_shampoo(model.parameters(), lr=1e-2)
    groups_before = len(opt.param_groups)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=torch.complex64))]})
    assert len(opt.param_groups) == groups_before, "a refused param group was still added"


# --- (e) parameters without a gradient --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl_shampoo", "shampoo"])
def test_parameter_without_gradient_is_skipped(kind):
    torch.manual_seed(4)
    used, unused = nn.Linear(3, 2), nn.Linear(2, 5)
    opt = make_optimizer(kind, list(used.parameters()) + list(unused.parameters()))
    unused_before = [p.detach().clone() for p in unused.parameters()]
    used_before = [p.detach().clone() for p in used.parameters()]
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        used.zero_grad(set_to_none=True)
        (used(torch.randn(6, 3, generator=gen)) ** 2).sum().backward()
        assert all(p.grad is None for p in unused.parameters())
        opt.step()
    saved = opt.state_dict()["state"]
    assert sorted(saved) == [0, 1]  # indices of the used parameters only
    # (opt.state is a defaultdict: use .get so that looking does not insert an entry)
    for p, old in zip(unused.parameters(), unused_before, strict=True):
        assert torch.equal(p.detach(), old)
        assert not opt.state.get(p)
    assert all(opt.state.get(p) for p in used.parameters())
    assert any(not torch.equal(p.detach(), old) for p, old in zip(used.parameters(), used_before, strict=True))


def test_step_without_any_gradient_is_a_no_op():
    model = make_model(5)
    opt = precond.kl_shampoo(model.parameters(), lr=1e-2)
    before = snapshot(model, opt)
    opt.step()
    assert_bitwise_equal(before, model, opt)
    assert len(opt.state) == 0


# --- (f) named parameters ---------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["kl_shampoo", "shampoo"]), which=st.integers(0, 3), good_steps=st.integers(0, 2), seed=seeds
)
def test_named_parameters_are_accepted_and_named_in_errors(kind, which, good_steps, seed):
    gen = torch.Generator().manual_seed(seed)
    model = make_model(seed)
    opt = make_optimizer(kind, model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    for _ in range(good_steps):
        backward(model, gen)
        opt.step()
    backward(model, gen)
    param = list(model.parameters())[which]
    param.grad.view(-1)[0] = math.nan
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError) as info:
        opt.step()
    message = str(info.value)
    assert names[which] in message
    assert all(n not in message for i, n in enumerate(names) if i != which)
    assert_bitwise_equal(before, model, opt)


def test_named_parameters_in_sparse_and_complex_messages():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = precond.kl_shampoo(emb.named_parameters(), lr=1e-2)
    emb(torch.tensor([3])).sum().backward()
    with pytest.raises(RuntimeError, match="weight"):
        opt.step()


# --- zero-size parameters ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl_shampoo", "shampoo"])
@pytest.mark.parametrize("on_nonfinite", ["raise", "ignore"])
def test_zero_size_parameter_does_not_break_the_step(kind, on_nonfinite):
    """A parameter with no entries (legal in torch; torch.optim.Adam steps over it) must not crash the step."""
    empty = nn.Parameter(torch.zeros(0, 3))
    other = nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(6)))
    opt = make_optimizer(kind, [empty, other], on_nonfinite=on_nonfinite)
    before = other.detach().clone()
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        empty.grad = torch.zeros(0, 3)
        other.grad = torch.randn(3, 2, generator=gen)
        opt.step()
    assert empty.shape == (0, 3)
    assert not torch.equal(other.detach(), before)
    assert torch.isfinite(other).all()
