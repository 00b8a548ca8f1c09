"""Checkpoints of ``precond.Optimizer``: the plain description of a configuration, the checks a loaded state must
pass before anything is replaced, and the part classes that ``torch.load(..., weights_only=True)`` may rebuild.

``state_dict()`` stores each group's preconditioner as plain data (:func:`describe`), so an optimizer checkpoint
never needs a class to load. ``param_groups`` themselves hold the live part objects, and parts of torch's ecosystem
pickle them as they are (Lightning's ``BackboneFinetuning`` checkpoints a copy of ``optimizer.param_groups``, and
Lightning loads checkpoints with ``weights_only=True``); :func:`allow_library_parts` (run on ``import precond``)
and :func:`allow_parts` (run for every param group added) put those classes on torch's list of safe globals.

:func:`restore` builds the param groups and state a ``load_state_dict`` installs, and refuses — before anything
of the optimizer changes — a checkpoint of another configuration, of other group sizes or with a state whose
shapes do not fit the parameter it would be loaded into.
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import torch

from precond.blocking import Blocks
from precond.buckets import map_leaves
from precond.layout import Layout
from precond.state import BLOCKS, ParamState, read_step

CONFIG_KEY = "preconditioner"
PART_PACKAGES = ("structures", "estimators", "bases", "precond.appliers", "precond.preconditioner")


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


# --- weights_only loading of param_groups ------------------------------------------------------------------------
def _attrs_classes(obj: Any) -> Iterable[type]:
    """Every attrs class in the configuration tree ``obj`` (the object's own class and those of its fields)."""
    if attrs.has(type(obj)):
        yield type(obj)
        for field in attrs.fields(type(obj)):
            yield from _attrs_classes(getattr(obj, field.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _attrs_classes(item)


def allow_parts(obj: Any) -> None:
    """Let ``torch.load(..., weights_only=True)`` rebuild the attrs classes of configuration ``obj`` (a
    ``Preconditioner`` or a part, the library's or your own)."""
    torch.serialization.add_safe_globals(list(set(_attrs_classes(obj))))


def allow_package(package: str) -> None:
    """Put every attrs class defined in the loaded modules of ``package`` on torch's safe globals."""
    classes = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and attrs.has(value) and value.__module__ == name:
                classes.add(value)
    torch.serialization.add_safe_globals(sorted(classes, key=lambda c: (c.__module__, c.__qualname__)))


def allow_library_parts() -> None:
    """Import the part packages and put their attrs classes (and ``Preconditioner``) on torch's safe globals, so
    that ``param_groups`` pickled by another process load with ``weights_only=True`` right after ``import precond``.

    A package that is itself still being imported (``import bases`` before ``import precond``: the package imports
    ``precond.…``, which runs this) is read as far as it has come; ``structures``, ``estimators`` and ``bases`` call
    :func:`allow_package` once they are complete."""
    for package in PART_PACKAGES:
        importlib.import_module(package)
        allow_package(package)


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
    if len(saved_groups) != len(groups):
        raise ValueError(f"loaded state dict has a different number of parameter groups: {len(saved_groups)} saved, "
                         f"{len(groups)} in this optimizer")
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
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

    new_groups = []
    for group, saved in zip(groups, saved_groups):
        settings = copy.deepcopy({key: value for key, value in saved.items() if key not in ("params", CONFIG_KEY)})
        new_group = {**{key: value for key, value in group.items() if key != "params"}, **settings,
                     "params": group["params"], CONFIG_KEY: group[CONFIG_KEY]}
        if check_group is not None:
            check_group(new_group)
        new_groups.append(new_group)

    owner = {}
    for group, saved in zip(new_groups, saved_groups):
        for saved_id, p in zip(saved["params"], group["params"]):
            owner[saved_id] = (p, group)
    for saved_id, value in saved_state.items():
        if saved_id in owner:
            p, group = owner[saved_id]
            blocks = group[CONFIG_KEY].blocks(p.shape)
            if blocks is None:
                check_state(value, group[CONFIG_KEY].plan(p.shape), name_of(p))
            else:
                check_blocked_state(value, blocks, name_of(p))

    state: defaultdict = defaultdict(dict)
    for saved_id, value in saved_state.items():
        if saved_id in owner:
            p = owner[saved_id][0]
            state[p] = _restore_state(value, p)
        else:
            state[saved_id] = value
    return new_groups, state
