"""Checkpoints of ``precond.Optimizer``: the plain description of a configuration and the checks a loaded state must
pass before anything is replaced.

``state_dict()`` stores each group's preconditioner as plain data (:func:`describe`), so an optimizer checkpoint
never needs a class to load. (``param_groups`` themselves hold the live part objects, which some tools pickle as they
are: ``precond.safe_globals`` lists their classes as safe for ``torch.load(..., weights_only=True)``.)

:func:`restore` builds the param groups and state a ``load_state_dict`` installs, and refuses — before anything
of the optimizer changes — a checkpoint of another configuration, of other group sizes or with a state whose
shapes do not fit the parameter it would be loaded into.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import attrs
import torch

from precond.layout import Blocks, Layout
from precond.state import BLOCKS, ParamState, map_leaves, read_step

CONFIG_KEY = "preconditioner"


def describe(obj: Any) -> Any:
    """Plain-data description of a frozen attrs configuration (kept in ``state_dict`` instead of objects):
    ``{"class": qualified name, field: description, …}``, recursively; other values are kept as they are."""
    if attrs.has(type(obj)):
        return {
            "class": type(obj).__qualname__,
            **{f.name: describe(getattr(obj, f.name)) for f in attrs.fields(type(obj))},
        }
    return obj


def _field_default(field: Any) -> Any:
    default = field.default
    return default.factory() if isinstance(default, attrs.Factory) else default


def same_config(saved: Any, obj: Any) -> bool:
    """Whether a saved description matches the configuration ``obj``; a field the saved description lacks (a
    checkpoint older than that option) matches when ``obj`` has the field's default value."""
    return not config_differences(saved, obj)


def config_differences(saved: Any, obj: Any, path: str = "") -> list[str]:
    """Where a saved description and the configuration ``obj`` differ, one line per field (``"applier.floor:
    saved 0 …, current 'roundoff'"``); a field the saved description lacks stands for its default value."""
    where = path or "the preconditioner"
    if not attrs.has(type(obj)):
        return [] if saved == obj else [f"{where}: saved {saved!r}, current {obj!r}"]
    if not isinstance(saved, dict) or saved.get("class") != type(obj).__qualname__:
        found = saved.get("class") if isinstance(saved, dict) else saved
        return [f"{where}: saved {found!r}, current {type(obj).__qualname__}"]
    out = []
    for f in attrs.fields(type(obj)):
        value, inner = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if f.name in saved:
            out += config_differences(saved[f.name], value, inner)
        elif f.default is attrs.NOTHING:
            out.append(f"{inner}: not in the checkpoint, current {describe(value)!r}")
        elif describe(value) != describe(_field_default(f)):
            out.append(f"{inner}: saved {describe(_field_default(f))!r} (the checkpoint predates this option: its "
                       f"default), current {describe(value)!r}")
    unknown = set(saved) - {"class", *(f.name for f in attrs.fields(type(obj)))}
    prefix = f"{path}." if path else ""
    out += [f"{prefix}{name}: in the checkpoint, unknown to this version" for name in sorted(unknown)]
    return out


# --- loading ---------------------------------------------------------------------------------------------------------
def check_state(storage: dict[str, Any], layout: Layout, name: str) -> None:
    """Refuse a saved per-parameter state that does not fit ``layout`` (the plan of the parameter it would load into):
    ``S_k`` and ``Q_k`` must be ``d_k × d_k``, ``λ_k`` of length ``d_k`` and the momentum of the viewed shape."""
    if isinstance(storage, dict) and not storage:  # a parameter the optimizer has not stepped yet
        return
    if isinstance(storage, dict) and BLOCKS in storage:
        raise ValueError(f"the saved state of parameter {name} is cut into {len(storage[BLOCKS])} blocks, but the "
                         f"parameter of shape {layout.shape} is planned whole here; was the checkpoint made with "
                         "another max_dim or large= setting, or for another model?")
    try:
        read_step(storage)
        ps = ParamState.of(storage, layout)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as error:
        raise ValueError(f"the saved state of parameter {name} is not a precond state (reading it failed: "
                         f"{type(error).__name__} {error})") from None
    d = layout.view_shape
    expected = [(f"S_{k}", t, (d[k], d[k])) for k, t in enumerate(ps.S)]
    expected += [(f"Q_{k}", t, (d[k], d[k])) for k, t in enumerate(ps.Q)]
    expected += [(f"λ_{k}", t, (d[k],)) for k, t in enumerate(ps.lam)]
    expected.append(("momentum", ps.momentum, tuple(d)))
    for what, tensor, shape in expected:
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape):
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"the saved state of parameter {name} does not fit it: {what} is {found}, but the parameter of shape "
                f"{layout.shape} (viewed as {layout.view_shape}) needs {shape}; was the checkpoint made for another "
                "model, or with the parameters in another order?")


def check_blocked_state(storage: dict[str, Any], blocks: Blocks, name: str) -> None:
    """Refuse a saved state of a parameter cut into ``blocks`` unless it holds exactly one state per block
    (``{"blocks": {"0": …, …}}``), each fitting its block's layout (:func:`check_state`)."""
    if isinstance(storage, dict) and not storage:
        return
    saved = storage.get(BLOCKS) if isinstance(storage, dict) else None
    expected = {str(i) for i in range(blocks.count)}
    if not isinstance(saved, dict) or set(saved) != expected:
        found = "no blocks" if not isinstance(saved, dict) else f"blocks {sorted(saved, key=str)}"
        raise ValueError(f"the saved state of parameter {name} does not fit it: the parameter is cut into "
                         f"{blocks.count} blocks ({blocks.describe()}), the checkpoint has {found}; was it made with "
                         "another max_dim or large= setting, or for another model?")
    for i, layout in enumerate(blocks.layouts):
        check_state(saved[str(i)], layout, f"{name} (block {i})")


def _restore_state(value: Any, p: torch.Tensor) -> Any:
    """A loaded per-parameter state on ``p``'s device, in its saved dtype (float32 factors of bfloat16 weights stay
    float32); 0-d tensors (the step count) stay where they are, as in ``torch.optim``."""
    return map_leaves(value, lambda t: t.to(device=p.device if t.ndim else t.device, copy=True))


def restore(groups: list[dict[str, Any]], state_dict: dict[str, Any], name_of: Callable[[torch.Tensor], str],
            check_group: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], defaultdict]:
    """The ``(param_groups, state)`` that loading ``state_dict`` into an optimizer with ``groups`` gives.

    As ``torch.optim.Optimizer.load_state_dict``: saved groups and current groups are matched in order, a saved
    group's settings replace the current ones (a setting the checkpoint lacks keeps its current value), the saved
    ``param_names`` replace the current ones when present, and a saved state entry that belongs to no parameter is
    kept as it is. Unlike it, each group keeps its own preconditioner (the saved description must match it), and
    the saved tensors keep their dtype. Every check runs before anything is built, and nothing in ``groups`` is
    changed: a refused checkpoint leaves the optimizer as it was.
    """
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    _check_groups(groups, saved_groups)
    new_groups = [_loaded_group(group, saved, check_group) for group, saved in zip(groups, saved_groups, strict=True)]
    owner = {saved_id: (p, group) for group, saved in zip(new_groups, saved_groups, strict=True)
             for saved_id, p in zip(saved["params"], group["params"], strict=True)}
    for saved_id, value in saved_state.items():
        if saved_id in owner:
            _check_saved_state(value, *owner[saved_id], name_of)

    state: defaultdict = defaultdict(dict)
    for saved_id, value in saved_state.items():
        if saved_id in owner:
            p = owner[saved_id][0]
            state[p] = _restore_state(value, p)
        else:
            state[saved_id] = value
    return new_groups, state


def _check_groups(groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]]) -> None:
    """Refuse saved groups of another count, another size or another preconditioner configuration."""
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups: {len(saved_groups)} saved, "
                         f"{len(groups)} in this optimizer")
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                             f"group: group {i} has {len(saved['params'])} saved parameters and "
                             f"{len(group['params'])} here")
        differences = config_differences(saved.get(CONFIG_KEY), group[CONFIG_KEY])
        if differences:
            raise ValueError(
                f"the checkpoint was made with another preconditioner configuration (group {i}):\n  "
                + "\n  ".join(differences) + "\nbuild the optimizer with the saved configuration before loading "
                "(e.g. pass the saved value of each field above to the preset or part)")


def _loaded_group(group: dict[str, Any], saved: dict[str, Any],
                  check_group: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """The group ``group`` becomes: the saved settings over the current ones, its own parameters and
    preconditioner; checked by ``check_group``."""
    settings = copy.deepcopy({key: value for key, value in saved.items() if key not in ("params", CONFIG_KEY)})
    new_group = {**{key: value for key, value in group.items() if key != "params"}, **settings,
                 "params": group["params"], CONFIG_KEY: group[CONFIG_KEY]}
    if check_group is not None:
        check_group(new_group)
    return new_group


def _check_saved_state(value: Any, p: torch.Tensor, group: dict[str, Any],
                       name_of: Callable[[torch.Tensor], str]) -> None:
    """Refuse the saved state of ``p`` unless it fits ``p``'s plan in ``group`` (whole or cut into blocks)."""
    blocks = group[CONFIG_KEY].blocks(p.shape)
    if blocks is None:
        check_state(value, group[CONFIG_KEY].plan(p.shape), name_of(p))
    else:
        check_blocked_state(value, blocks, name_of(p))
