"""Turn a :class:`~precond.ablate.variants.Variant` into an optimizer, through the library's public API only."""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping, Optional

import torch

import precond
from precond.ablate import catalog


def build_optimizer(variant: Any, params: Iterable[Any], lr: float,
                    weight_decay: Optional[float] = None) -> torch.optim.Optimizer:
    """The optimizer ``variant`` describes over ``params`` (parameters or param-group dicts) at learning rate ``lr``.

    ``weight_decay`` applies unless the variant sets its own; ``None`` leaves the preset's default (0 for a
    composition, torch's 0.01 for AdamW).
    """
    options = variant.options
    if "weight_decay" not in options and weight_decay is not None:
        options["weight_decay"] = weight_decay
    if variant.preset == "adamw":
        return _adamw(params, lr, options)
    if variant.preset is not None:
        return _preset(variant.preset, params, lr, options)
    return composition_optimizer(params, lr, options)


def _adamw(params: Iterable[Any], lr: float, options: Mapping[str, Any]) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"betas": (options.get("beta1", 0.9), options.get("beta2", 0.999))}
    kwargs.update({key: options[key] for key in ("eps", "weight_decay") if key in options})
    return torch.optim.AdamW(_plain(params), lr=lr, **kwargs)


def _plain(params: Iterable[Any]) -> list[Any]:
    """``params`` without names (``torch.optim`` before 2.6 refuses ``(name, tensor)`` pairs)."""
    def strip(items: Iterable[Any]) -> list[Any]:
        return [item[1] if isinstance(item, tuple) else item for item in items]

    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**group, "params": strip(group["params"])} for group in params]
    return strip(params)


def _preset(preset: str, params: Iterable[Any], lr: float, options: Mapping[str, Any]) -> torch.optim.Optimizer:
    factory = getattr(precond, preset)
    kwargs: dict[str, Any] = {key: options[key] for key in
                              ("eps", "weight_decay", "every", "max_dim", "bias_correction", "decay_order", "graft")
                              if key in options}
    if "graft" in kwargs and kwargs["graft"] == "none":
        kwargs["graft"] = None
    if "applier" in options:
        kwargs["p"] = options["applier"]
    if "beta1" in options or "beta2" in options:
        default_beta1, default_beta2 = inspect.signature(factory).parameters["betas"].default
        kwargs["betas"] = (options.get("beta1", default_beta1), options.get("beta2", default_beta2))
    return factory(params, lr=lr, **kwargs)


def make_preconditioner(options: Mapping[str, Any]) -> precond.Preconditioner:
    """The ``precond.Preconditioner`` of a resolved composition (every key of ``keys.READERS`` present), each part
    built by the table :data:`precond.ablate.catalog.PARTS`."""
    return precond.Preconditioner(
        structure=catalog.build("structure", options), estimator=catalog.build("estimator", options),
        basis=catalog.build("basis", options), applier=catalog.build("graft", options))


def composition_optimizer(params: Iterable[Any], lr: float, options: Mapping[str, Any]) -> precond.Optimizer:
    return precond.Optimizer(
        params, preconditioner=make_preconditioner(options), lr=lr, momentum=options["beta1"],
        weight_decay=options.get("weight_decay", 0.0), decay_order=options["decay_order"],
        bias_correction=options["bias_correction"])
