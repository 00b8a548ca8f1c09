"""precond behaves as ``torch.optim.AdamW`` in PyTorch's own optimizer tests (issue 15).

Each test names the test of PyTorch's ``test/test_optim.py`` (``TestOptimRenewed``) or the documented contract
(``torch.optim.Optimizer``'s hook docstrings) it mirrors, and where it can, runs ``torch.optim.AdamW`` through the
same steps as the reference for what the contract means. Also: the class per preset, checkpoint refusals that leave
the optimizer exactly as it was, and ``param_groups`` that load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn

import bases
import estimators
import precond
import structures

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------------------------------------
def _linear(n_in=3, n_out=4, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def _backward(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    model.zero_grad(set_to_none=True)
    x = torch.randn(6, model.in_features, generator=gen)
    (model(x).sin() ** 2).sum().backward()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        _backward(model, step)
        opt.step()


def _kl(params, **kw) -> precond.Optimizer:
    return precond.KLShampoo(params, lr=1e-2, every=2, **kw)


def _tensors(state) -> dict:
    """``{path: tensor or value}`` of a nested state (dicts keyed by parameter index or name)."""
    out = {}

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        else:
            out[path] = value

    walk(state, ())
    return out


def _assert_same(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key, value in ta.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == tb[key].dtype and torch.equal(value, tb[key]), key
        else:
            assert value == tb[key], key


class _Untouched:
    """Everything of an optimizer a refused ``load_state_dict`` / ``add_param_group`` must leave as it was: the group
    dicts (the same objects, with the same contents), the state (the same tensors, the same values), and the steps
    that follow (compared with a twin that never saw the refused call)."""

    def __init__(self, opt: precond.Optimizer) -> None:
        self.opt = opt
        self.groups = list(opt.param_groups)
        self.contents = [dict(g) for g in opt.param_groups]
        self.params = [list(g["params"]) for g in opt.param_groups]
        self.state = {p: _tensors(s) for p, s in opt.state.items()}
        self.values = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                       for p, s in self.state.items()}

    def check(self) -> None:
        opt = self.opt
        assert opt.param_groups == self.groups
        assert all(a is b for a, b in zip(opt.param_groups, self.groups, strict=True))
        for group, contents, params in zip(opt.param_groups, self.contents, self.params, strict=True):
            assert group.keys() == contents.keys()
            assert all(group[k] is v for k, v in contents.items() if k != "params")
            assert all(a is b for a, b in zip(group["params"], params, strict=True))
        assert {p: s for p, s in opt.state.items() if s}.keys() == {p: s for p, s in self.state.items() if s}.keys()
        for p, leaves in self.state.items():
            now = _tensors(opt.state[p])
            assert now.keys() == leaves.keys()
            for key, tensor in leaves.items():
                assert now[key] is tensor, f"state {key} was replaced"
                old = self.values[p][key]
                assert torch.equal(tensor, old) if isinstance(old, torch.Tensor) else tensor == old


def _assert_continues_like(model, opt, twin_model, twin_opt, steps=range(10, 14)) -> None:
    _train(model, opt, steps)
    _train(twin_model, twin_opt, steps)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


# --- item 1: add_param_group with a generator ----------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=1e-2), _kl], ids=["AdamW", "KLShampoo"])
def test_add_param_group_reads_a_generator_once(make):
    """torch.optim's fine-tuning pattern ``opt.add_param_group({"params": layer.parameters()})`` (the docstring of
    ``Optimizer.add_param_group``): the group holds the layer's parameters, and the layer trains."""
    frozen, head = _linear(seed=0), _linear(4, 2, seed=1)
    opt = make(frozen.parameters())
    opt.add_param_group({"params": head.parameters()})
    assert [p for p in opt.param_groups[1]["params"]] == list(head.parameters())
    before = [p.detach().clone() for p in head.parameters()]
    for step in range(3):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(step)
        head(frozen(torch.randn(5, 3, generator=gen))).pow(2).sum().backward()
        opt.step()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, head.parameters(), strict=True))


# --- reliability issue: sets are refused ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["group", "add_param_group", "top level"])
def test_errors_params_as_a_set(where):
    """``test_errors``: torch.optim refuses ``{"params": set(...)}`` (a set's order changes between runs, and a
    checkpoint maps state to parameters by position); precond also refuses a set as the whole ``params``."""
    model = _linear()
    with pytest.raises(TypeError, match="ordered collections"):
        torch.optim.AdamW([{"params": set(model.parameters())}])
    if where == "group":
        with pytest.raises(TypeError, match="not a set"):
            _kl([{"params": set(model.parameters())}])
    elif where == "top level":
        with pytest.raises(TypeError, match="not a set"):
            _kl(set(model.parameters()))
    else:
        opt = _kl([model.weight])
        untouched = _Untouched(opt)
        with pytest.raises(TypeError, match="not a set"):
            opt.add_param_group({"params": {model.bias}})
        untouched.check()


# --- item 7: a tensor lr must have one element ---------------------------------------------------------------------
@pytest.mark.parametrize("lr", [torch.tensor([1e-3, 1e-3]), torch.zeros(0)], ids=["two", "empty"])
def test_errors_tensor_lr_must_be_1_element(lr):
    """``test_errors`` (``get_error_inputs_for_all_optims``): ``ValueError: Tensor lr must be 1-element``, at
    construction and in ``add_param_group`` (which leaves the optimizer as it was)."""
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        torch.optim.AdamW([nn.Parameter(torch.randn(2, 2))], lr=lr)
    for name in precond.PRESET_CLASSES.values():
        with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
            getattr(precond, name)([nn.Parameter(torch.randn(2, 2))], lr=lr)
    opt = _kl([nn.Parameter(torch.randn(2, 2))])
    untouched = _Untouched(opt)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))], "lr": lr})
    untouched.check()
    one = precond.KLShampoo([nn.Parameter(torch.randn(2, 2))], lr=torch.tensor([1e-3]))  # one element is fine
    assert one.param_groups[0]["lr"].numel() == 1


# --- item 5: param_names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("named_first", [True, False])
def test_can_load_from_to_named_state_dict(named_first):
    """``test_can_load_from_to_named_state_dict``: an optimizer built from ``named_parameters()`` keeps the names as
    ``param_names`` in its groups and its ``state_dict``; loading named ↔ unnamed works, the names following
    torch's rule (the saved ones win, else the optimizer's stay), and the loaded optimizer continues as the
    saving one (AdamW is run alongside as the reference for the names)."""
    results = {}
    for kind, make in (("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-2)), ("KLShampoo", _kl)):
        model = _linear()
        first = make(model.named_parameters() if named_first else model.parameters())
        _train(model, first, range(3))
        saved = copy.deepcopy(first.state_dict())
        twin = copy.deepcopy(model)
        second = make(twin.parameters() if named_first else twin.named_parameters())
        second.load_state_dict(saved)
        _train(model, first, range(3, 6))
        _train(twin, second, range(3, 6))
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
        results[kind] = (saved["param_groups"][0].get("param_names"), second.param_groups[0].get("param_names"),
                         second.state_dict()["param_groups"][0].get("param_names"))
    assert results["KLShampoo"] == results["AdamW"]
    assert results["KLShampoo"][0] == (["weight", "bias"] if named_first else None)
    assert results["KLShampoo"][1] == ["weight", "bias"]


def test_errors_params_and_groups_with_and_without_names():
    """``test_errors``: torch.optim refuses to mix groups with and without names (the names of one would not line
    up with the other's in a checkpoint); precond now hands the names to torch and refuses alike."""
    a, b = _linear(), _linear(4, 2)
    with pytest.raises(ValueError, match="with/without names"):
        torch.optim.AdamW([{"params": a.named_parameters()}, {"params": b.parameters()}])
    with pytest.raises(ValueError, match="with/without names"):
        _kl([{"params": a.named_parameters()}, {"params": b.parameters()}])
    opt = _kl(a.named_parameters())
    untouched = _Untouched(opt)
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": b.parameters()})
    untouched.check()
    opt.add_param_group({"params": b.named_parameters()})
    assert opt.param_groups[1]["param_names"] == ["weight", "bias"]


# --- item 4: the state-dict post-hook sees what state_dict() returns ---------------------------------------------
def test_state_dict_post_hook_sees_the_returned_dict():
    """``test_state_dict_post_hook`` and ``register_state_dict_post_hook``'s docstring ("post-processing on the
    state_dict before it is returned"): the hook sees the plain description that the caller gets, and a dict it
    returns is what ``state_dict()`` returns."""
    model = _linear()
    opt = _kl(model.parameters())
    _train(model, opt, range(2))
    seen = []

    def hook(optimizer, state_dict):
        seen.append(state_dict["param_groups"][0]["preconditioner"])
        return {**state_dict, "note": "from the hook"}

    opt.register_state_dict_post_hook(hook)
    result = opt.state_dict()
    assert seen == [result["param_groups"][0]["preconditioner"]]
    assert isinstance(seen[0], dict) and seen[0]["class"] == "Preconditioner"
    assert result["note"] == "from the hook"


# --- item 2: the load pre-hook's dict is what loads ---------------------------------------------------------------
@pytest.mark.parametrize("kind, key", [("AdamW", "exp_avg"), ("KLShampoo", "momentum")])
def test_load_state_dict_pre_hook_returned_dict_is_loaded(kind, key):
    """``test_load_state_dict_pre_hook_and_prepend`` and ``register_load_state_dict_pre_hook``'s docstring ("If a
    state_dict is returned, it will be used to be loaded"): a hook returning a copy with the first moment zeroed
    loads zeros, as AdamW does."""
    model = _linear()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if kind == "AdamW" else _kl(model.parameters())
    _train(model, opt, range(3))

    def zero_first_moment(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0][key].zero_()
        return state_dict

    saved = opt.state_dict()
    assert saved["state"][0][key].abs().sum() > 0
    opt.register_load_state_dict_pre_hook(zero_first_moment)
    opt.load_state_dict(saved)
    assert torch.count_nonzero(opt.state[model.weight][key]) == 0
    assert saved["state"][0][key].abs().sum() > 0  # the caller's dict is not changed


def test_load_state_dict_pre_hook_can_migrate_the_configuration():
    """The configuration check runs after the pre-hooks, so a hook can migrate an older checkpoint (here: one saved
    with refresh period 3 loaded into an optimizer with period 2)."""
    model = _linear()
    old = precond.KLShampoo(model.parameters(), lr=1e-2, every=3)
    _train(model, old, range(3))
    saved = old.state_dict()
    new = _kl(copy.deepcopy(model).parameters())
    untouched = _Untouched(new)
    with pytest.raises(ValueError, match="another preconditioner configuration"):
        new.load_state_dict(saved)
    untouched.check()

    def migrate(optimizer, state_dict):  # state_dict is a shallow copy: replace what is changed
        state_dict["param_groups"] = copy.deepcopy(state_dict["param_groups"])
        for group in state_dict["param_groups"]:
            group["preconditioner"]["basis"]["every"] = 2

    new.register_load_state_dict_pre_hook(migrate)
    new.load_state_dict(saved)
    assert saved["param_groups"][0]["preconditioner"]["basis"]["every"] == 3
    _assert_same(new.state_dict()["state"], saved["state"])


# --- item 3: load post-hooks run after loading has finished -------------------------------------------------------
@pytest.mark.parametrize("kind, key", [("AdamW", "exp_avg"), ("KLShampoo", "momentum")])
def test_load_state_dict_post_hook_sees_the_loaded_optimizer(kind, key):
    """``test_load_state_dict_post_hook`` and ``register_load_state_dict_post_hook``'s docstring ("post-processing
    after load_state_dict has loaded the state_dict"): inside the hook the optimizer is fully loaded (the saved
    lr, precond's live preconditioner), and state the hook sets stays, as with AdamW."""
    model = _linear()
    make = (lambda ps: torch.optim.AdamW(ps, lr=1e-2)) if kind == "AdamW" else _kl
    opt = make(model.parameters())
    _train(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["lr"] = 0.125
    seen = {}

    def hook(optimizer):
        seen["lr"] = optimizer.param_groups[0]["lr"]
        seen["preconditioner"] = optimizer.param_groups[0].get("preconditioner")
        optimizer.state[model.weight][key] = torch.zeros_like(optimizer.state[model.weight][key])

    fresh = make(model.parameters())
    fresh.register_load_state_dict_post_hook(hook)
    fresh.load_state_dict(saved)
    assert seen["lr"] == 0.125
    if kind == "KLShampoo":
        assert isinstance(seen["preconditioner"], precond.Preconditioner)
    assert torch.count_nonzero(fresh.state[model.weight][key]) == 0
    _train(model, fresh, range(3, 5))  # and the optimizer still steps
    assert torch.isfinite(model.weight).all()


# --- item 8: a step count that is a plain number ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(precond.PRESET_CLASSES.values()))
def test_load_nontensor_step(name):
    """``test_load_nontensor_step``: a checkpoint whose ``step`` entries are Python numbers (older torch,
    hand-converted checkpoints) loads and then steps exactly like the same checkpoint with tensor steps."""
    model = _linear()
    options = {} if name == "Muon" else {"every": 2}  # Muon refreshes nothing
    opt = getattr(precond, name)(model.parameters(), lr=1e-2, **options)
    _train(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    plain = copy.deepcopy(saved)
    for entry in plain["state"].values():
        entry["step"] = entry["step"].item()
    runs = []
    for state_dict in (saved, plain):
        twin = copy.deepcopy(model)
        again = getattr(precond, name)(twin.parameters(), lr=1e-2, **options)
        again.load_state_dict(state_dict)
        _train(twin, again, range(3, 8))
        runs.append([p.detach() for p in twin.parameters()] + [again.state[p]["step"] for p in twin.parameters()])
    assert all(isinstance(a, torch.Tensor) and torch.equal(a, b) for a, b in zip(*runs, strict=True))


# --- reliability issue: a state of other shapes is refused, and refusals change nothing ---------------------------
REFUSALS = {
    "shapes (Linear(3, 8) into Linear(8, 3))": (lambda sd: sd, "does not fit"),
    "group count": (lambda sd: {**sd, "param_groups": sd["param_groups"] * 2}, "number of parameter groups"),
    "group size": (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "params": [0]}]},
                   "doesn't match the size"),
    "configuration": (lambda sd: {**sd, "param_groups": [
        {**sd["param_groups"][0],
         "preconditioner": {**sd["param_groups"][0]["preconditioner"], "first_step": "update"}}]},
        "another preconditioner configuration"),
    "bad saved lr": (lambda sd: {**sd, "param_groups": [{**sd["param_groups"][0], "lr": -1.0}]}, r"\blr\b"),
    "not a precond state": (lambda sd: {**sd, "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(1)}}},
                            "not a precond state"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_load_state_dict_leaves_the_optimizer_exactly_as_it_was(case):
    """A checkpoint that cannot belong to this optimizer raises ``ValueError`` before anything is replaced: the
    optimizer keeps its groups and state (the same objects, the same values) and continues exactly like a twin
    that never saw the checkpoint. The shape case is the reliability issue's: without the check it loaded
    silently and every later ``step()`` failed."""
    change, message = REFUSALS[case]
    other = _linear(3, 8, seed=1) if case.startswith("shapes") else _linear(seed=1)
    other_opt = _kl(other.parameters())
    _train(other, other_opt, range(3))
    checkpoint = change(copy.deepcopy(other_opt.state_dict()))

    shape = (8, 3) if case.startswith("shapes") else (3, 4)
    model, twin = _linear(*shape), _linear(*shape)
    opt, twin_opt = _kl(model.parameters()), _kl(twin.parameters())
    _train(model, opt, range(4))
    _train(twin, twin_opt, range(4))
    untouched = _Untouched(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(checkpoint)
    untouched.check()
    _assert_continues_like(model, opt, twin, twin_opt)


def test_loaded_checkpoint_of_a_transposed_layer_would_have_broken_every_step():
    """Why the shape check: the mismatched state, forced in without it, makes the next step fail (so refusing it
    at load time loses nothing that worked)."""
    source, target = _linear(3, 8), _linear(8, 3)
    source_opt, target_opt = _kl(source.parameters()), _kl(target.parameters())
    _train(source, source_opt, range(3))
    state = source_opt.state_dict()["state"]
    for p, saved in zip(target.parameters(), state.values(), strict=True):
        target_opt.state[p] = copy.deepcopy(saved)  # before its first step: the buckets are built from this state
    with pytest.raises(RuntimeError):
        _train(target, target_opt, range(3, 4))


# --- the class per preset ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("function, name", sorted(precond.PRESET_CLASSES.items()))
def test_preset_classes_are_torch_optimizers_named_after_the_method(function, name):
    """Each preset is a ``torch.optim.Optimizer`` subclass (clients that want a class, e.g. Hugging Face's
    ``optimizer_cls_and_kwargs``, build it with their own param groups), the lower-case name is the same class
    (one definition of each composition), and ``repr`` names the method (``test_optimizer_can_be_printed``)."""
    cls = getattr(precond, name)
    assert inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and issubclass(cls, precond.Optimizer)
    assert getattr(precond, function) is cls
    parameters = list(inspect.signature(cls).parameters)
    if name == "Muon":  # its two parts: Muon's momentum, Adam's betas
        assert parameters[:5] == ["params", "lr", "momentum", "nesterov", "weight_decay"]
        assert {"adam_lr", "adam_betas", "adam_eps", "adam_params"} <= set(parameters)
        kwargs = dict(momentum=0.9, adam_betas=(0.9, 0.95), adam_eps=1e-8)
    else:
        assert parameters[:7] == ["params", "lr", "betas", "weight_decay", "eps", "every", "max_dim"]
        kwargs = dict(betas=(0.9, 0.95), eps=1e-8)
    assert parameters[-1] == "options"
    decay, other = _linear(), _linear(4, 2)
    groups = [{"params": list(decay.parameters()), "weight_decay": 0.1},
              {"params": list(other.parameters()), "weight_decay": 0.0}]
    opt = cls(groups, lr=1e-3, **kwargs)  # as transformers' create_optimizer calls it
    decays = [0.1, 0.1, 0.0, 0.0] if name == "Muon" else [0.1, 0.0]  # Muon splits each group: matrix, vector
    assert [g["weight_decay"] for g in opt.param_groups] == decays
    assert repr(opt).startswith(f"{name} (")
    assert type(opt).__name__ == name


def test_preset_class_is_the_documented_composition():
    """``KLShampoo`` holds the composition its docstring states (and ``options`` reach ``precond.Optimizer``)."""
    opt = precond.KLShampoo(_linear().parameters(), lr=1e-3, betas=(0.8, 0.9), eps=1e-7, every=4, max_dim=64,
                            nesterov=True)
    expected = precond.Preconditioner(
        structure=structures.NMode(max_dim=64), estimator=estimators.KL(beta=0.9), basis=bases.QRPowerStep(every=4),
        applier=precond.Power(p=0.5, eps=1e-7, eps_placement="outside"))
    group = opt.param_groups[0]
    assert group["preconditioner"] == expected
    assert (group["momentum"], group["nesterov"], group["decay_order"]) == (0.8, True, "after")


# --- weights_only loading of param_groups ---------------------------------------------------------------------------
def _groups_with_every_part():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    out = {name: getattr(precond, name)(model.parameters()) for name in precond.PRESET_CLASSES.values()}
    out["muon"] = precond.muon(model.parameters())
    custom = precond.KLShampoo([{"params": model[0].parameters(), "structure": structures.Kronecker(),
                                 "basis": bases.CholeskyQR(every=3)},
                                {"params": model[1].parameters(), "structure": structures.Diagonal(),
                                 "basis": bases.Identity()}])
    out["overrides"] = custom
    return out


def test_param_groups_load_with_weights_only():
    """``torch.save(opt.param_groups)`` then ``torch.load(..., weights_only=True)`` (what Lightning's
    ``BackboneFinetuning`` checkpoints and loads) gives equal groups, live parts included, for every preset."""
    for name, opt in _groups_with_every_part().items():
        buffer = io.BytesIO()
        torch.save(opt.param_groups, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        for a, b in zip(opt.param_groups, loaded, strict=True):
            assert a.keys() == b.keys(), name
            assert a["preconditioner"] == b["preconditioner"], name
            assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True)), name


def test_param_groups_load_with_weights_only_in_a_fresh_process(tmp_path):
    """In a new process (a resumed run), right after the imports — isort's order, where ``bases`` is imported
    before ``precond`` — and before any optimizer is built."""
    path = tmp_path / "groups.pt"
    torch.save({name: opt.param_groups for name, opt in _groups_with_every_part().items()}, path)
    script = ("import bases, estimators, precond, structures, sys, torch\n"
              "groups = torch.load(sys.argv[1], weights_only=True)\n"
              "print(sorted({type(g['preconditioner'].basis).__name__ for gs in groups.values() for g in gs}),\n"
              "      sorted({type(g['preconditioner'].applier).__name__ for gs in groups.values() for g in gs}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("['CholeskyQR', 'Eigh', 'Identity', 'QRPowerStep'] "
                                     "['Graft', 'NewtonSchulz', 'Normalize', 'Power']")
