"""What the battery checks of an optimizer's life besides its updates: parameters without a gradient, checkpoints
(``state_dict``, ``torch.load(weights_only=True)``), copies (``copy.deepcopy``, pickle) and refused input.

Every check trains ``SPLIT`` steps, does its thing, trains to ``STEPS`` and compares with the uninterrupted run of
one process **bitwise**: a resumed or copied optimizer "steps exactly like this one" (``Optimizer.__getstate__``,
``docs/scaling.md``), and a refused step changes nothing (``on_nonfinite="raise"``: "leaving all state as it was").
"""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any, Callable

import torch
from torch import nn

from tests import registry
from tests.battery_modes import Mode
from tests.battery_problem import SKIPPED, STEPS, backward, make_model, parameters, train
from tests.battery_runs import build, final, release, trained

SPLIT = 3
"""The step after which a run is checkpointed, copied or given a bad gradient: after the refresh of step 2, before
that of step 4."""


def tensors(value: Any, path: tuple = ()) -> dict[tuple, Any]:
    """``{path: leaf}`` of nested dicts, lists and tuples (tensors cloned, other leaves as they are)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in tensors(item, (*path, str(key))).items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in tensors(item, (*path, i)).items()}
    return {path: value.detach().clone() if isinstance(value, torch.Tensor) else value}


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[tuple, Any]:
    """Every leaf of the optimizer's state (keyed by parameter name) and of its param groups (but ``params``)."""
    names = {id(p): name for name, p in model.named_parameters()}
    state = {names[id(p)]: s for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return tensors({"state": state, "groups": groups})


def differing(before: dict[tuple, Any], after: dict[tuple, Any]) -> list[tuple]:
    """Paths whose leaves differ in any bit (or exist in only one of the two)."""
    out = [path for path in before.keys() ^ after.keys()]
    for path in before.keys() & after.keys():
        a, b = before[path], after[path]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
                a.shape == b.shape and torch.equal(a, b)
        else:
            same = a is b or a == b
        if not same:
            out.append(path)
    return out


def assert_bitwise(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    wrong = {name: (run[name] - value).abs().max().item() for name, value in reference.items()
             if not (run[name].dtype == value.dtype and torch.equal(run[name], value))}
    assert not wrong, f"{what}: parameters differ from the uninterrupted run by up to {wrong}"


# --- checkpoints ---------------------------------------------------------------------------------------------------
def _through_bytes(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def resumed(entry: registry.Entry, mode: Mode, carry: Callable[[dict], dict]) -> dict[str, torch.Tensor]:
    """Train to ``SPLIT``, hand the ``state_dict`` through ``carry``, load it into a fresh optimizer on a fresh model
    holding the trained weights, and train to ``STEPS``."""
    model, optimizer = trained(entry, mode, range(1, SPLIT + 1))
    saved, weights = carry(optimizer.state_dict()), model.state_dict()
    release(optimizer)
    model = make_model()
    model.load_state_dict(weights)
    optimizer = build(entry, model, mode)
    optimizer.load_state_dict(saved)
    train(model, optimizer, range(SPLIT + 1, STEPS + 1))
    release(optimizer)
    return parameters(model)


def check_state_dict(entry: registry.Entry, mode: Mode) -> None:
    assert_bitwise(resumed(entry, mode, lambda saved: saved), final(entry.name, mode.name), "resumed")


def check_weights_only(entry: registry.Entry, mode: Mode) -> None:
    assert_bitwise(resumed(entry, mode, _through_bytes), final(entry.name, mode.name),
                   "resumed from torch.load(weights_only=True)")


# --- copies --------------------------------------------------------------------------------------------------------
def _pickled(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value))


COPIERS: dict[str, Callable[[Any], Any]] = {"deepcopy": copy.deepcopy, "pickle": _pickled}


def check_copy(entry: registry.Entry, mode: Mode, how: str) -> None:
    """The model and optimizer copied together at ``SPLIT``: the copy and the original both go on exactly like the
    uninterrupted run."""
    model, optimizer = trained(entry, mode, range(1, SPLIT + 1))
    twin_model, twin = COPIERS[how]((model, optimizer))
    for m, o in ((model, optimizer), (twin_model, twin)):
        train(m, o, range(SPLIT + 1, STEPS + 1))
        release(o)
    reference = final(entry.name, mode.name)
    assert_bitwise(parameters(twin_model), reference, f"the {how} copy")
    assert_bitwise(parameters(model), reference, f"the original after a {how}")


# --- input ---------------------------------------------------------------------------------------------------------
def check_partial(entry: registry.Entry, mode: Mode) -> None:
    """At the steps where a branch is skipped, its parameters (and their optimizer state) stay bit for bit."""
    model = make_model()
    optimizer = build(entry, model, mode)
    try:
        for step in range(1, STEPS + 1):
            backward(model, step)
            idle = {name: p for name, p in model.named_parameters() if p.grad is None}
            assert bool(idle) == (step in SKIPPED)
            before = {name: p.detach().clone() for name, p in idle.items()}
            state = {name: tensors(optimizer.state.get(p, {})) for name, p in idle.items()}
            optimizer.step()
            for name, p in idle.items():
                assert torch.equal(p.detach(), before[name]), f"step {step} moved {name}, which had no gradient"
                changed = differing(state[name], tensors(optimizer.state.get(p, {})))
                assert not changed, f"step {step} changed the state {changed} of {name}, which had no gradient"
    finally:
        release(optimizer)


def _poison(model: nn.Module, step: int) -> None:
    if step == SPLIT + 1:
        model.a.weight.grad[0, 0] = float("nan")


def check_bad_input(entry: registry.Entry, mode: Mode) -> None:
    """A NaN gradient with ``on_nonfinite="raise"``: ``FloatingPointError``, every tensor of the model and the
    optimizer untouched; redone with the healthy gradient, the run goes on exactly like the uninterrupted one."""
    model, optimizer = trained(entry, mode, range(1, SPLIT + 1))
    try:
        backward(model, SPLIT + 1)
        _poison(model, SPLIT + 1)
        weights, state = parameters(model), optimizer_tensors(model, optimizer)
        try:
            optimizer.step()
        except FloatingPointError:
            pass
        else:
            raise AssertionError("a NaN gradient was not refused (on_nonfinite='raise')")
        assert_bitwise(parameters(model), weights, "after the refused step, the model")
        changed = differing(state, optimizer_tensors(model, optimizer))
        assert not changed, f"the refused step changed the optimizer's {changed}"
        train(model, optimizer, range(SPLIT + 1, STEPS + 1))
    finally:
        release(optimizer)
    assert_bitwise(parameters(model), final(entry.name, mode.name), "after a refused step and the healthy ones")


def check_async_defers(entry: registry.Entry, mode: Mode) -> None:
    """On CPU an asynchronous refresh is computed at once but installed at the next step (``precond.refresh_schedule``):
    after a refresh step the refreshes wait, so the bitwise comparisons of the asynchronous modes test the deferred
    install, not a synchronous path. An entry without refreshed bases (``bases.Identity``) never has one waiting."""
    model = make_model()
    optimizer = build(entry, model, mode)
    waiting = []
    for step in range(1, STEPS + 1):
        train(model, optimizer, range(step, step + 1))
        waiting.append(optimizer.pending_refreshes())
    release(optimizer)
    refreshed = any(optimizer.refresh_offset(p, k) is not None
                    for group in optimizer.param_groups for p in group["params"] for k in range(p.ndim))
    assert (max(waiting) > 0) == refreshed, (
        f"refreshes waiting after each step: {waiting}, and the entry {'has' if refreshed else 'has no'} "
        "refreshed bases")
