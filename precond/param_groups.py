"""What a param group may hold: its ``params`` and its hyperparameters, checked when a group is added, loaded or
stepped (a user may change ``param_groups`` at any time), each refusal naming the field and what it accepts."""

from __future__ import annotations

import math
from typing import Any

import torch

from precond.precision import check_rotation_dtype
from precond.preconditioner import Preconditioner
from precond.validators import is_number, plain_number

CONFIG_KEY = "preconditioner"
NUMBER_KEYS = ("lr", "momentum", "weight_decay")
"""The group hyperparameters that are numbers; NumPy scalars among them are stored as Python numbers."""


def plain_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """Replace, in place, a NumPy real scalar among ``group``'s numbers (``lr=np.float32(1e-3)``, accepted as
    ``torch.optim`` accepts it) by the Python number of the same value, and return ``group``: the step's arithmetic
    is then the one of a Python float (a ``np.float32`` would round ``1 − β₁`` to float32) and a checkpoint holds no
    NumPy object (``torch.load(..., weights_only=True)`` refuses those)."""
    for key in NUMBER_KEYS:
        if key in group:
            group[key] = plain_number(group[key])
    return group


def check_lr(lr: Any, read_tensor: bool) -> None:
    """``lr`` must be a finite number ≥ 0 or a one-element floating tensor (its value is read only when
    ``read_tensor``: at construction; at ``step()`` it joins the gradients' finiteness check instead)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:  # torch.optim's wording
            raise ValueError(f"Tensor lr must be 1-element, got a tensor of shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must hold a floating-point value, got dtype {lr.dtype}; pass a float or "
                             "e.g. torch.tensor(1e-3)")
        if not read_tensor:
            return
        value = float(lr.detach().reshape(()).item())
    elif is_number(lr):
        value = float(lr)
    else:
        raise ValueError(f"lr must be a number or a one-element tensor, got {type(lr).__name__} {lr!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr must be a finite number ≥ 0, got {lr!r}")


def check_hyperparameters(group: dict[str, Any], read_tensor: bool = True) -> None:
    """Refuse a group whose hyperparameters would break the step, naming the field and what it accepts."""
    check_lr(group["lr"], read_tensor)
    momentum, weight_decay = group["momentum"], group["weight_decay"]
    if not (is_number(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum (β₁ of the EMA m ← β₁m + (1−β₁)g) must be a number in [0, 1), got {momentum!r}")
    if group["nesterov"] and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0")
    if not (is_number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}")
    if group["decay_order"] not in ("before", "after"):
        raise ValueError("decay_order must be 'before' (AdamW) or 'after' (SOAP, KL prototype), "
                         f"got {group['decay_order']!r}")
    if not isinstance(group["bias_correction"], bool):
        raise ValueError(f"bias_correction must be True or False, got {group['bias_correction']!r}")
    check_rotation_dtype(group.get("rotation_dtype"))
    if not isinstance(group[CONFIG_KEY], Preconditioner):
        raise TypeError(f"preconditioner must be a precond.Preconditioner, got {type(group[CONFIG_KEY]).__name__}")


def params_list(params: Any, what: str = "params") -> list[Any]:
    """``params`` (of the optimizer or of one param group) as a list, read once (a generator such as
    ``model.parameters()`` can be read only once). A lone tensor is taken as ``[tensor]``; a set is refused, as
    ``torch.optim`` does, because its order (and with it the meaning of a checkpoint) changes between runs.
    ``model.named_parameters()`` pairs are kept: ``torch.optim`` records their names as the group's ``param_names``."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"{what} must be an ordered collection (a list, or model.parameters()), not a set: the order "
                        "of a set changes between runs, and a checkpoint maps its state to parameters by position")
    if isinstance(params, dict):
        raise TypeError(f"{what} must be an iterable of tensors or param-group dicts, got a dict; "
                        "pass [group] for a single param group")
    return list(params)


def named(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
