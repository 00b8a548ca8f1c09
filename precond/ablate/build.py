"""Turn a :class:`~precond.ablate.variants.Variant` into an optimizer, through the library's public API only (the
named peers through :mod:`precond.ablate.peers`)."""

from __future__ import annotations

import inspect
from typing import Any, Collection, Iterable, Mapping, Optional

import torch

import precond
import structures
from precond.ablate import catalog, keys, peers
from precond.presets import adam_group


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
    if "embeddings" in options:
        params = route_embeddings(params, adam_params, options)
    if variant.preset is not None:
        return _preset(variant.preset, params, lr, options, fast)
    return composition_optimizer(params, lr, options, fast)


def _preset(preset: str, params: Iterable[Any], lr: float, options: Mapping[str, Any],
            fast: Mapping[str, Any]) -> torch.optim.Optimizer:
    factory = getattr(precond, preset)
    kwargs: dict[str, Any] = {key: options[key] for key in
                              ("eps", "weight_decay", "every", "max_dim", "large", "bias_correction", "decay_order",
                               "graft", "track_drift", "floor", "fold_every", "momentum_in_basis", "basis_power",
                               "refresh", *keys.SPEED_KEYS)
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


ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-8
"""The AdamW that ``embeddings=adam`` gives the embeddings and the head: the workbench's AdamW baseline
(``adamw,beta2=0.95``; torch's ε), bias-corrected, decay before the update, as ``torch.optim.AdamW``, at the
variant's lr or at ``adam_lr`` where the variant gives one (the schedule scales both alike)."""


def _embedding_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The group keys that ``embeddings`` gives the routed matrices (``precond.Optimizer``'s per-group parts)."""
    if options["embeddings"] == "adam":
        own_lr = {"lr": options["adam_lr"]} if "adam_lr" in options else {}
        return {**adam_group(ADAMW_BETAS, ADAMW_EPS), **own_lr}
    return {"structure": structures.OneSided(max_dim=options.get("max_dim", 4096))}


def route_embeddings(params: Iterable[Any], adam_params: Collection[str],
                     options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``params`` (named parameters or groups of them) with the matrices named in ``adam_params`` (the task's
    embeddings and output head, :func:`precond.ablate.train.adam_routed`) moved into groups of their own that
    carry :func:`_embedding_settings`; each group's own keys (e.g. ``weight_decay``) stay with both halves."""
    groups = list(params)
    groups = groups if groups and isinstance(groups[0], dict) else [{"params": groups}]
    if not adam_params:
        raise ValueError("embeddings=... needs the task to name its embeddings and head (adam_params); this task "
                         "names none")
    settings, out = _embedding_settings(options), []
    for group in groups:
        extra = {key: value for key, value in group.items() if key != "params"}
        items = list(group["params"])
        if any(not isinstance(item, tuple) for item in items):
            raise ValueError("embeddings=... routes parameters by name: give named parameters "
                             "(model.named_parameters())")
        rest = [item for item in items if item[0] not in adam_params]
        routed = [item for item in items if item[0] in adam_params]
        out += [{**extra, "params": rest}] if rest else []
        out += [{**extra, **settings, "params": routed}] if routed else []
    return out


def make_preconditioner(options: Mapping[str, Any]) -> precond.Preconditioner:
    """The ``precond.Preconditioner`` of a resolved composition (every key of ``keys.READERS`` present), each part
    built by the table :data:`precond.ablate.catalog.PARTS`."""
    return precond.Preconditioner(
        structure=catalog.build("structure", options), estimator=catalog.build("estimator", options),
        basis=catalog.build("basis", options), applier=catalog.build("graft", options),
        fold_every=options.get("fold_every", 1), momentum_in_basis=options.get("momentum_in_basis", False))


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
