"""Named optimizers the workbench builds outside the Kronecker presets' common signature.

The peers of the comparison, selected by name like a preset (``--variant hb_kl_shampoo``), trained on the same
batches under the same learning-rate schedule (the schedule writes ``group["lr"]``, which each of them reads at
every step), and our ``muon``, whose signature differs from the presets'. Each one's fastest configuration that
keeps its math: fused AdamW on CUDA (``foreach`` on the CPU), HeavyBall compiled on CUDA in torch's "default"
mode (``precond.bench.contenders``; eager on the CPU, where compiling costs more than a short run gains), and
our optimizers without the per-step finiteness check when the run asks for it (``sync_free``).

==================  =====================================================================  ====================
name                optimizer                                                              keys
==================  =====================================================================  ====================
``adamw``           ``torch.optim.AdamW``, betas (β₁, β₂) default (0.9, 0.999)             β₁ β₂ ε wd
``hb_kl_shampoo``   HeavyBall ``KLShampoo`` (``heavyball``)                                 β₁ β₂ ε wd T max_dim
``hb_soap``         HeavyBall ``SOAP`` (``heavyball``)                                      β₁ β₂ ε wd T max_dim
``po_soap``         pytorch-optimizer ``SOAP`` (``pytorch_optimizer``)                      β₁ β₂ ε wd T max_dim
``torch_muon``      ``torch.optim.Muon`` on hidden matrices + ``torch.optim.AdamW``         β₁ (= μ) wd adam_lr
``muon``            ``precond.muon`` (Newton–Schulz and Adam parts in one optimizer)        β₁ (= μ) wd adam_lr
                                                                                            ns_dtype
==================  =====================================================================  ====================

The Shampoo-family peers get the settings of our presets unless the variant says otherwise (as
``precond.bench.contenders`` builds them): T = ``every`` = 10, ``max_dim`` 4096, betas (0.9, 0.95) with β₂ also
the factors' EMA weight (HeavyBall's ``shampoo_beta``; pytorch-optimizer takes β₂ for it), ε 1e-8. Their other
options keep their library's defaults. Weight decay is the run's setting (decoupled, matrices only), else each
library's default.

Muon (Jordan et al. 2024; torch's and ours alike: lr scaled by √max(1, A/B), Nesterov momentum μ = 0.95, bf16
Newton–Schulz) updates the hidden matrices; the vectors, the embeddings and the output head go to Adam, as
Muon's authors do (``adam_params``: the names the training loop marks, see
:func:`precond.ablate.train.adam_routed`). The Adam part runs at ``adam_lr`` (default 3e-4, Jordan's auxiliary
Adam) with betas (0.9, 0.95) and ε 1e-10, under the same schedule. ``torch.optim.Muon`` takes only 2-D
parameters: a convolution kernel is refused with a message (our ``muon`` views it as a matrix).

A peer whose library is not installed is reported by :func:`missing` and skipped by the runner (a line in the
summary says so), never a crash.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import attrs
import torch

SHAMPOO_PEER_KEYS = ("beta1", "beta2", "eps", "weight_decay", "every", "max_dim")
MUON_KEYS = ("beta1", "weight_decay", "adam_lr")

DEFAULT_EVERY, DEFAULT_MAX_DIM, DEFAULT_BETAS, DEFAULT_EPS = 10, 4096, (0.9, 0.95), 1e-8
MUON_ADAM = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-10}
"""The Adam part of both Muons (Jordan's ``MuonWithAuxAdam``), ``lr`` overridden by ``adam_lr``."""


@attrs.frozen
class Context:
    """What a builder needs beyond the variant: the names of matrices that a Muon gives to Adam (embeddings and
    head), and whether our optimizers may skip their per-step finiteness check (``on_nonfinite="ignore"``)."""

    adam_params: frozenset[str] = frozenset()
    sync_free: bool = False


Builder = Callable[[list[Any], float, Mapping[str, Any], Context], torch.optim.Optimizer]


@attrs.frozen
class Peer:
    """A named optimizer: the keys it accepts, how it is built and what it needs installed."""

    keys: tuple[str, ...]
    build: Builder
    needs: str | None = None
    """The module that must be importable (``None``: always available)."""
    install: str = ""
    """How to install it, for the report."""

    def missing(self) -> str | None:
        """Why it cannot be built here, or ``None`` when it can."""
        if self.needs is None:
            return None
        if self.needs == "torch.optim.Muon":
            return None if hasattr(torch.optim, "Muon") else f"torch {torch.__version__} has no torch.optim.Muon " \
                                                              f"(torch ≥ 2.9 has it)"
        if importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed ({self.install})"
        return None


# --- parameters ------------------------------------------------------------------------------------------------
def plain_params(params: Iterable[Any]) -> list[Any]:
    """``params`` (tensors, ``(name, tensor)`` pairs or group dicts of them) without names (``torch.optim`` before
    2.6 and other libraries refuse pairs)."""
    def strip(items: Iterable[Any]) -> list[Any]:
        return [item[1] if isinstance(item, tuple) else item for item in items]

    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**group, "params": strip(group["params"])} for group in params]
    return strip(params)


def _groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    params = list(params)
    return params if params and isinstance(params[0], dict) else [{"params": params}]


def _device(params: list[Any]) -> torch.device:
    for group in _groups(params):
        for item in group["params"]:
            return (item[1] if isinstance(item, tuple) else item).device
    return torch.device("cpu")


def _betas(options: Mapping[str, Any], default: tuple[float, float]) -> tuple[float, float]:
    return options.get("beta1", default[0]), options.get("beta2", default[1])


def _decay(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"weight_decay": options["weight_decay"]} if "weight_decay" in options else {}


# --- builders ----------------------------------------------------------------------------------------------------
def _fastest_adamw(device: torch.device) -> dict[str, Any]:
    """Fused on CUDA, one ``foreach`` kernel per operation elsewhere: the same update as the plain loop."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_adamw(params: list[Any], lr: float, options: Mapping[str, Any], context: Context) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"betas": _betas(options, (0.9, 0.999)), **_decay(options)}
    if "eps" in options:
        kwargs["eps"] = options["eps"]
    return torch.optim.AdamW(plain_params(params), lr=lr, **kwargs, **_fastest_adamw(_device(params)))


def _shampoo_peer_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    return {"betas": _betas(options, DEFAULT_BETAS), "eps": options.get("eps", DEFAULT_EPS), **_decay(options),
            "precondition_frequency": options.get("every", DEFAULT_EVERY)}


def _heavyball_builder(cls_name: str) -> Builder:
    def build(params: list[Any], lr: float, options: Mapping[str, Any], context: Context) -> torch.optim.Optimizer:
        from precond.bench.contenders import _heavyball

        cls = _heavyball(cls_name)  # sets HeavyBall's compile mode to the benchmark's ("default")
        if _device(params).type != "cuda":
            import heavyball.utils

            heavyball.utils.compile_mode = None  # eager on the CPU
        settings = _shampoo_peer_settings(options)
        max_dim = options.get("max_dim", DEFAULT_MAX_DIM)
        return cls(plain_params(params), lr=lr, shampoo_beta=settings["betas"][1],
                   max_precond_dim=max_dim if max_dim is not None else 2 ** 31 - 1, **settings)

    return build


def build_po_soap(params: list[Any], lr: float, options: Mapping[str, Any], context: Context) -> torch.optim.Optimizer:
    from precond.bench.contenders import _pytorch_optimizer_soap

    max_dim = options.get("max_dim", DEFAULT_MAX_DIM)
    return _pytorch_optimizer_soap()(plain_params(params), lr=lr, **_shampoo_peer_settings(options),
                                     max_precondition_dim=max_dim if max_dim is not None else 2 ** 31 - 1)


def _split_for_muon(params: list[Any], adam_params: Collection[str]) -> tuple[list[dict], list[dict]]:
    """The groups of ``params`` split into hidden matrices (Muon) and the rest (Adam), each keeping its group's
    own keys (e.g. ``weight_decay``). ``torch.optim.Muon`` refuses tensors that are not 2-D, so a kernel of
    more dimensions that is not routed to Adam is refused here with the alternative."""
    muon_groups, adam_groups = [], []
    for group in _groups(params):
        extra = {key: value for key, value in group.items() if key != "params"}
        hidden, rest = [], []
        for index, item in enumerate(group["params"]):
            name, tensor = item if isinstance(item, tuple) else (f"parameter {index}", item)
            if tensor.ndim >= 2 and name not in adam_params:
                if tensor.ndim != 2:
                    raise ValueError(f"torch.optim.Muon takes only 2-D parameters; {name} has shape "
                                     f"{tuple(tensor.shape)}. Use the variant muon (precond.muon views a kernel as a "
                                     f"matrix) or a task without convolutions")
                hidden.append(tensor)
            else:
                rest.append(tensor)
        if hidden:
            muon_groups.append({**extra, "params": hidden})
        if rest:
            adam_groups.append({**extra, "params": rest})
    return muon_groups, adam_groups


def build_torch_muon(params: list[Any], lr: float, options: Mapping[str, Any],
                     context: Context) -> torch.optim.Optimizer:
    from precond.ablate.combined import Combined

    muon_groups, adam_groups = _split_for_muon(params, context.adam_params)
    parts: list[torch.optim.Optimizer] = []
    if muon_groups:
        parts.append(torch.optim.Muon(muon_groups, lr=lr, momentum=options.get("beta1", 0.95), nesterov=True,
                                      **_decay(options)))
    if adam_groups:
        parts.append(torch.optim.AdamW(adam_groups, lr=options.get("adam_lr", MUON_ADAM["lr"]),
                                       betas=MUON_ADAM["betas"], eps=MUON_ADAM["eps"], **_decay(options),
                                       **_fastest_adamw(_device(params))))
    return Combined(parts)


def build_muon(params: list[Any], lr: float, options: Mapping[str, Any], context: Context) -> torch.optim.Optimizer:
    import precond

    named = {item[0] for group in _groups(params) for item in group["params"] if isinstance(item, tuple)}
    fast = {"on_nonfinite": "ignore"} if context.sync_free else {}
    ns_dtype = {"ns_dtype": getattr(torch, options["ns_dtype"])} if "ns_dtype" in options else {}
    return precond.muon(params, lr=lr, momentum=options.get("beta1", 0.95), nesterov=True, **_decay(options),
                        adam_lr=options.get("adam_lr", MUON_ADAM["lr"]), adam_betas=MUON_ADAM["betas"],
                        adam_eps=MUON_ADAM["eps"], adam_params=sorted(context.adam_params & named), **ns_dtype,
                        **fast)


PEERS: dict[str, Peer] = {
    "adamw": Peer(("beta1", "beta2", "eps", "weight_decay"), build_adamw),
    "hb_kl_shampoo": Peer(SHAMPOO_PEER_KEYS, _heavyball_builder("KLShampoo"), "heavyball",
                          "pip install heavyball==3.2.1"),
    "hb_soap": Peer(SHAMPOO_PEER_KEYS, _heavyball_builder("SOAP"), "heavyball", "pip install heavyball==3.2.1"),
    "po_soap": Peer(SHAMPOO_PEER_KEYS, build_po_soap, "pytorch_optimizer", "pip install pytorch-optimizer==4.1.0"),
    "torch_muon": Peer(MUON_KEYS, build_torch_muon, "torch.optim.Muon"),
    "muon": Peer((*MUON_KEYS, "ns_dtype"), build_muon),
}
"""Every optimizer built by name here rather than through a Kronecker preset's signature."""

BASELINES = ("adamw", "hb_kl_shampoo", "hb_soap", "po_soap", "torch_muon")
"""Named variants that are other libraries' optimizers: by default the summary's differences are taken to the
best of them (the best baseline)."""


def missing(name: str | None) -> str | None:
    """Why the named variant ``name`` cannot be built on this machine, or ``None`` (also for a composition)."""
    peer = PEERS.get(name) if name is not None else None
    return None if peer is None else peer.missing()
