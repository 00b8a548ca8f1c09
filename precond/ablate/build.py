"""Turn a :class:`~precond.ablate.variants.Variant` into an optimizer, through the library's public API only (the
named peers through :mod:`precond.ablate.peers`)."""

from __future__ import annotations

import inspect
from typing import Any, Collection, Iterable, Mapping, Optional

import torch

import precond
from precond.ablate import catalog, keys, peers


def build_optimizer(variant: Any, params: Iterable[Any], lr: float, weight_decay: Optional[float] = None,
                    adam_params: Collection[str] = (), sync_free: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``variant`` describes over ``params`` (parameters or param-group dicts) at learning rate ``lr``.

    ``weight_decay`` applies unless the variant sets its own; ``None`` leaves the preset's default (0 for a
    composition, torch's 0.01 for AdamW). ``adam_params`` names the matrices a Muon gives to Adam (embeddings and
    head); ``sync_free`` builds our optimizers with ``on_nonfinite="ignore"`` (no per-step host sync; a blow-up is
    then caught at the next validation). A peer whose library is missing raises ``ImportError`` saying so.
    """
    options = variant.options
    if "weight_decay" not in options and weight_decay is not None:
        options["weight_decay"] = weight_decay
    if variant.preset in peers.PEERS:
        reason = peers.missing(variant.preset)
        if reason is not None:
            raise ImportError(f"variant {variant.name}: {reason}")
        context = peers.Context(adam_params=frozenset(adam_params), sync_free=sync_free)
        return peers.PEERS[variant.preset].build(list(params), lr, options, context)
    fast = {"on_nonfinite": "ignore"} if sync_free else {}
    if variant.preset is not None:
        return _preset(variant.preset, params, lr, options, fast)
    return composition_optimizer(params, lr, options, fast)


def _preset(preset: str, params: Iterable[Any], lr: float, options: Mapping[str, Any],
            fast: Mapping[str, Any]) -> torch.optim.Optimizer:
    factory = getattr(precond, preset)
    kwargs: dict[str, Any] = {key: options[key] for key in
                              ("eps", "weight_decay", "every", "max_dim", "large", "bias_correction", "decay_order",
                               "graft", *keys.SPEED_KEYS)
                              if key in options}
    if "graft" in kwargs and kwargs["graft"] == "none":
        kwargs["graft"] = None
    if "applier" in options:
        kwargs["p"] = options["applier"]
    kwargs.update(_rotation(options))
    if "beta1" in options or "beta2" in options:
        default_beta1, default_beta2 = inspect.signature(factory).parameters["betas"].default
        kwargs["betas"] = (options.get("beta1", default_beta1), options.get("beta2", default_beta2))
    return factory(params, lr=lr, **kwargs, **fast)


def make_preconditioner(options: Mapping[str, Any]) -> precond.Preconditioner:
    """The ``precond.Preconditioner`` of a resolved composition (every key of ``keys.READERS`` present), each part
    built by the table :data:`precond.ablate.catalog.PARTS`."""
    return precond.Preconditioner(
        structure=catalog.build("structure", options), estimator=catalog.build("estimator", options),
        basis=catalog.build("basis", options), applier=catalog.build("graft", options))


def composition_optimizer(params: Iterable[Any], lr: float, options: Mapping[str, Any],
                          fast: Optional[Mapping[str, Any]] = None) -> precond.Optimizer:
    return precond.Optimizer(
        params, preconditioner=make_preconditioner(options), lr=lr, momentum=options["beta1"],
        weight_decay=options.get("weight_decay", 0.0), decay_order=options["decay_order"],
        bias_correction=options["bias_correction"], **_rotation(options), **_speed(options), **(fast or {}))


def _rotation(options: Mapping[str, Any]) -> dict[str, Any]:
    """``rotation_dtype`` as ``precond.Optimizer`` takes it (a torch dtype), when the variant sets it."""
    return {"rotation_dtype": getattr(torch, options["rotation_dtype"])} if "rotation_dtype" in options else {}


def _speed(options: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of :data:`precond.ablate.keys.SPEED_KEYS` the variant sets (``stagger``, ``capture``, …)."""
    return {key: options[key] for key in keys.SPEED_KEYS if key in options}
