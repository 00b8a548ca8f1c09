"""Build each optimizer under comparison with equal settings (T, max dim, β, ε)."""

from __future__ import annotations

import importlib.util
from typing import Callable, Iterable

import torch

import bases
import precond

Factory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def available(name: str) -> bool:
    module = {"hb": "heavyball", "po": "pytorch_optimizer"}.get(name.split("_")[0])
    return module is None or importlib.util.find_spec(module) is not None


RACE_RULES: dict[str, dict] = {
    "drift": {"drift_tolerance": 0.2, "track_drift": True},
    "budget": {"drift_tolerance": 0.2, "track_drift": True, "refresh_budget": 50, "fold_every": 2,
               "betas": (0.9, 0.95 ** 2), "rotation_dtype": torch.bfloat16},
}
"""The refresh rules of ``ablations/race.toml``'s two fastest variants that kept their loss (the embeddings'
AdamW of the race's budgeted variant is a training-task choice the step benchmark does not make)."""

REFRESH_AB = ("qr", "refine", "refine1", "refine_bf16", "cholesky64", "cholesky64_2pass")
"""The refreshers of the basis refresh A/B lines (issue 23, lever 1), each in place of Cholesky-QR."""

LEVERS = {
    # each adds one lever to the previous line, so the table shows what each is worth
    "kl_shampoo_unstacked": {"stack": False},
    "kl_shampoo": {},
    "kl_shampoo_stagger": {"stagger": True},
    "kl_shampoo_cholqr": {"stagger": True, "basis": "cholesky"},
    "kl_shampoo_tf32": {"stagger": True, "basis": "cholesky", "tf32": True},
    "kl_shampoo_fast": {"stagger": True, "basis": "cholesky", "tf32": True, "async_refresh": True},
    "kl_shampoo_fast_sync": {"stagger": True, "basis": "cholesky", "tf32": True},
    "kl_shampoo_captured": {"stagger": True, "basis": "cholesky", "tf32": True, "capture": True},
    "kl_shampoo_fast_captured": {"stagger": True, "basis": "cholesky", "tf32": True, "async_refresh": True,
                                 "capture": True},
    "kl_shampoo_fast_overlap": {"stagger": True, "basis": "cholesky", "tf32": True, "async_refresh": True,
                                "overlap_backward": True},
    # bfloat16 rotations (rotation_dtype): time each beside the same line without it
    "kl_shampoo_fast_sync_bf16": {"stagger": True, "basis": "cholesky", "tf32": True,
                                  "rotation_dtype": torch.bfloat16},
    "kl_shampoo_fast_captured_bf16": {"stagger": True, "basis": "cholesky", "tf32": True, "async_refresh": True,
                                      "capture": True, "rotation_dtype": torch.bfloat16},
    # the basis refresh A/B (issue 23, lever 1): the fast configurations with each refresher in place of Cholesky-QR
    **{f"kl_shampoo_{basis}_fast_sync": {"stagger": True, "basis": basis, "tf32": True}
       for basis in REFRESH_AB},
    **{f"kl_shampoo_{basis}_fast": {"stagger": True, "basis": basis, "tf32": True, "async_refresh": True}
       for basis in REFRESH_AB},
    **{f"kl_shampoo_{basis}_fast_captured": {"stagger": True, "basis": basis, "tf32": True, "async_refresh": True,
                                             "capture": True}
       for basis in REFRESH_AB},
    # the race's configurations (issue 23, docs/results/race): the tracked drift rule, then the budgeted levers,
    # with the preset's QR refresh or with Refine's
    **{f"kl_shampoo_{basis}_{rule}_{mode}": {"stagger": True, "basis": basis, "tf32": True, "async_refresh": True,
                                             **({"capture": True} if mode == "captured" else {}), **RACE_RULES[rule]}
       for basis in ("qr", "refine", "cholesky64", "cholesky64_2pass") for rule in ("drift", "budget")
       for mode in ("fast", "captured")},
}
# the momentum kept in the bases (Preconditioner(momentum_in_basis=True), issue 23, lever 4): each line "<name>_mib"
# is line <name> with it, to be timed beside it
_WITH_MOMENTUM_IN_BASIS = ("kl_shampoo_qr_fast_captured", *(f"kl_shampoo_qr_{rule}_{mode}" for rule in RACE_RULES
                                                               for mode in ("fast", "captured")))
LEVERS.update({f"{name}_mib": {**LEVERS[name], "momentum_in_basis": True} for name in _WITH_MOMENTUM_IN_BASIS})

BASES: dict[str, Callable[[int], object]] = {
    "cholesky": lambda every: bases.CholeskyQR(every=every),
    "cholesky64": lambda every: bases.CholeskyQR(every=every, precision="float64"),
    "cholesky64_2pass": lambda every: bases.CholeskyQR(every=every, precision="float64", plain_passes=1),
    "qr": lambda every: bases.QRPowerStep(every=every),
    "refine": lambda every: bases.Refine(every=every),  # two sweeps, TF32 products
    "refine1": lambda every: bases.Refine(every=every, sweeps=1),
    "refine_bf16": lambda every: bases.Refine(every=every, precision="bfloat16"),
}
"""The ``basis`` of a lever line: the refresher every group gets (none named: the preset's ``QRPowerStep``)."""


def _kl_with_levers(name: str, every: int, max_dim: int, lr: float, base: dict) -> Factory:
    options = dict(LEVERS[name])
    basis = options.pop("basis", None)
    groups_basis = BASES[basis](every) if basis is not None else None

    def make(params):
        params = list(params)
        if groups_basis is not None:
            params = [{"params": params, "basis": groups_basis}]
        return precond.kl_shampoo(params, lr=lr, every=every, max_dim=max_dim, **base, **options)

    return make


def factory(name: str, every: int, max_dim: int, lr: float = 1e-3, fast: bool = True) -> Factory:
    """The optimizer called ``name``. ``fast`` gives our presets the sync-free step (no NaN check)."""
    ours = {"on_nonfinite": "ignore"} if fast else {}
    if name in LEVERS:
        return _kl_with_levers(name, every, max_dim, lr, ours)
    table: dict[str, Factory] = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                                             **({"fused": True} if torch.cuda.is_available() else {"foreach": True})),
        "soap": lambda p: precond.soap(p, lr=lr, every=every, max_dim=max_dim, **ours),
        "soap_captured": lambda p: precond.soap(p, lr=lr, every=every, max_dim=max_dim, stagger=True, capture=True,
                                                **ours),
        "soap_bf16": lambda p: precond.soap(p, lr=lr, every=every, max_dim=max_dim, rotation_dtype=torch.bfloat16,
                                            **ours),
        "shampoo": lambda p: precond.shampoo(p, lr=lr, every=every, max_dim=max_dim, **ours),
        "hb_kl_shampoo": lambda p: _heavyball("KLShampoo")(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=every,
                                                           max_precond_dim=max_dim),
        "hb_soap": lambda p: _heavyball("SOAP")(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=every,
                                                max_precond_dim=max_dim),
        "po_soap": lambda p: _pytorch_optimizer_soap()(p, lr=lr, betas=(0.9, 0.95), precondition_frequency=every,
                                                       max_precondition_dim=max_dim),
    }
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(sorted([*table, *LEVERS]))}")
    return table[name]


HEAVYBALL_COMPILE_MODE = "default"
"""HeavyBall compiles its step with ``torch.compile``; its own default mode is "max-autotune-no-cudagraphs", whose
autotuning took over five minutes per optimizer on an H100 (and then chose cuBLAS for the large products).
The benchmark compiles it in torch's "default" mode to fit a 10-minute device slot; ``--heavyball-compile-mode``
restores any other mode."""


def _heavyball(cls: str):
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = HEAVYBALL_COMPILE_MODE
    return getattr(heavyball, cls)


def _pytorch_optimizer_soap():
    from pytorch_optimizer import SOAP

    return SOAP
