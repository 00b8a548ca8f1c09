"""Build each optimizer under comparison with equal settings (T, max dim, β, ε)."""

from __future__ import annotations

import importlib.util
from typing import Callable, Iterable

import torch

import precond

Factory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def available(name: str) -> bool:
    module = {"hb": "heavyball", "po": "pytorch_optimizer"}.get(name.split("_")[0])
    return module is None or importlib.util.find_spec(module) is not None


def factory(name: str, every: int, max_dim: int, lr: float = 1e-3, fast: bool = True) -> Factory:
    """The optimizer called ``name``. ``fast`` gives our presets the sync-free step (no NaN check)."""
    ours = {"on_nonfinite": "ignore"} if fast else {}
    table: dict[str, Factory] = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                             **({"fused": True} if torch.cuda.is_available() else {"foreach": True})),
        "kl_shampoo": lambda p: precond.kl_shampoo(p, lr=lr, every=every, max_dim=max_dim, **ours),
        "soap": lambda p: precond.soap(p, lr=lr, every=every, max_dim=max_dim, **ours),
        "shampoo": lambda p: precond.shampoo(p, lr=lr, every=every, max_dim=max_dim, **ours),
        "hb_kl_shampoo": lambda p: _heavyball("KLShampoo")(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=every,
                                                           max_precond_dim=max_dim),
        "hb_soap": lambda p: _heavyball("SOAP")(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=every,
                                                max_precond_dim=max_dim),
        "po_soap": lambda p: _pytorch_optimizer_soap()(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=every,
                                                       max_precondition_dim=max_dim),
    }
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(sorted(table))}")
    return table[name]


def _heavyball(cls: str):
    import heavyball

    return getattr(heavyball, cls)


def _pytorch_optimizer_soap():
    from pytorch_optimizer import SOAP

    return SOAP
