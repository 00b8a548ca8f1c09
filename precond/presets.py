"""Named optimizers, each a few lines of composition of the four parts.

Each preset is a class, a ``torch.optim.Optimizer`` (a :class:`precond.Optimizer` whose constructor builds the
preset's preconditioner): ``KLShampoo``, ``IdealizedKLShampoo``, ``KLSOAP``, ``Shampoo``, ``SOAP``, ``EShampoo``,
``OneSidedShampoo``. Clients that take an optimizer class (Hugging Face's ``optimizer_cls_and_kwargs``) build it
with their own param groups, and reprs and logs name the method. The lower-case names (``kl_shampoo``, …) are the
same classes under the names of the first release.

Every preset takes ``params, lr, betas=(β₁, β₂), weight_decay, eps, every (T), max_dim`` and passes any other
keyword (``nesterov``, ``decay_order``, ``bias_correction``, ``state_dtype``, ``on_nonfinite``) to
:class:`precond.Optimizer`. ``β₁`` is the optimizer's momentum, ``β₂`` the estimator's EMA weight ρ.
All use ``NMode`` by default, so conv kernels and 3-D (MoE, stacked) weights get one factor per mode; a mode
above ``max_dim`` is left without a dense factor (embeddings and LM heads work: only their small side is
preconditioned), and a vector parameter (bias, norm scale) gets a diagonal spectrum.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional

import bases
import estimators
import structures
from precond.appliers import Exponent, Graft, Normalize, Power
from precond.optimizer import Optimizer
from precond.preconditioner import Preconditioner

Betas = tuple[float, float]


def _settings(lr: float, betas: Betas, weight_decay: float, defaults: dict[str, Any],
              options: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's keywords of a preset; ``options`` (the caller's) override the preset's ``defaults``."""
    return dict(lr=lr, momentum=betas[0], weight_decay=weight_decay, **{**defaults, **options})


class KLShampoo(Optimizer):
    """KL-Shampoo (Lin et al. 2025, Fig. 3 right), without grafting, for weights of any order.

    ``KL(β₂)`` factors and λ-EMA in the stale basis · ``eigh`` once, then ``QRPowerStep`` every T = 10 steps (no
    sort) · ``Power(½)`` with ε outside the root. Defaults of the authors' prototype (yorkerlin/KL-Methods
    ``KLOpt``): λ₀ = 0.1, the clamp ``λ ≥ max(10, min(d_k, 4000))^{-2}``, a first step that only fills the
    statistics, no bias correction, decoupled weight decay after the update.
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: Betas = (0.9, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.KL(beta=betas[1]),
            basis=bases.QRPowerStep(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        ), **_settings(lr, betas, weight_decay, {"decay_order": "after"}, options))


kl_shampoo = KLShampoo


class IdealizedKLShampoo(Optimizer):
    """Idealized KL-Shampoo (Lin et al. 2025, Eq. 4 and Fig. 3 left): ``Q_k, λ_k = eigh(S_k)`` after every update,
    so ``P_j = S_j^{-1}`` exactly; with ``1/D_{-k}`` and the ½ root at any order (no published code has both)."""

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: Betas = (0.9, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, every: int = 1, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.KL(beta=betas[1], init_lambda=None, refresh_spectrum="reset"),
            basis=bases.Eigh(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        ), **_settings(lr, betas, weight_decay, {"decay_order": "after"}, options))


idealized_kl_shampoo = IdealizedKLShampoo


class KLSOAP(Optimizer):
    """KL-SOAP (KL-Methods ``KLOpt(using_klsoap=True)``): KL factors (their λ only feed ``Δ_k``) and Adam in the
    eigenbasis, ``V`` neither bias-corrected nor permuted, QR every T = 10 steps without sorting."""

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: Betas = (0.9, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.DenseSpectrum(estimators.KL(beta=betas[1]), beta=betas[1], bias_correction=False,
                                               transport="keep"),
            basis=bases.QRPowerStep(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        ), **_settings(lr, betas, weight_decay, {"decay_order": "after"}, options))


kl_soap = KLSOAP


class Shampoo(Optimizer):
    """Shampoo as in the widely used implementation (Shi et al. 2023, Meta's Distributed Shampoo).

    ``Shampoo(β₂)`` grams · ``Eigh`` every T = 10 steps (the seed paper's setting; stale roots in between) ·
    ``Power(p)`` with ε (1e-12) added to each eigenvalue · grafted onto Adam (β 0.999, ε 1e-10) per parameter ·
    bias-corrected momentum, decoupled weight decay before the update. ``p = 1/2`` is Shampoo² (default);
    ``p = "1/(2N)"`` (1/4 for a matrix) the original; ``graft=None`` the ungrafted method of Fig. 1.
    Not reproduced: Meta's bias correction of the factors themselves.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Betas = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-12, every: int = 10, max_dim: Optional[int] = 4096, p: Exponent = 0.5,
                 graft: Optional[Literal["adam", "rmsprop", "sgd"]] = "adam", **options: Any) -> None:
        applier = Power(p=p, eps=eps)
        super().__init__(params, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Shampoo(beta=betas[1]),
            basis=bases.Eigh(every=every),
            applier=Graft(applier, onto=graft) if graft else applier,
        ), **_settings(lr, betas, weight_decay, {"bias_correction": True}, options))


shampoo = Shampoo


class SOAP(Optimizer):
    """SOAP (Vyas et al. 2025; nikhilvyas/SOAP defaults): Adam run in Shampoo's eigenbasis.

    ``Frobenius(dense)``: grams with ρ = β₂ and a bias-corrected ``V`` in the rotated basis · ``eigh`` once, then
    ``QRPowerStep(sort=True)`` every T = 10 steps, ``V`` permuted with the sort · ``R/(√V̂ + ε)`` · bias-corrected
    momentum (SOAP's ``correct_bias``, with ε on ``√V̂`` as torch's Adam), weight decay after the update,
    first step fills only. Modes above ``max_dim`` (10000) are identity; vectors are plain Adam.
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: Betas = (0.95, 0.95), weight_decay: float = 0.01,
                 eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 10000, **options: Any) -> None:
        super().__init__(params, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Frobenius(beta=betas[1], spectrum="dense"),
            basis=bases.QRPowerStep(every=every, sort=True),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        ), **_settings(lr, betas, weight_decay, {"bias_correction": True, "decay_order": "after"}, options))


soap = SOAP


class EShampoo(Optimizer):
    """Eigenvalue-corrected Shampoo (Eschenhagen et al. 2025; Meta's ``EigenvalueCorrectedShampooPreconditionerList``).

    Grams and a bias-corrected ``V`` in the eigenbasis (ρ = β₂ = 0.999), ``V`` not carried across refreshes ·
    exact ``eigh`` every T = 100 steps (Meta's README) · ``R/(√V̂ + ε)``, ε = 1e-12 · the first gradient is used at
    once (no fill-only step), bias-corrected momentum, decoupled weight decay before the update.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Betas = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-12, every: int = 100, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Frobenius(beta=betas[1], spectrum="dense", transport="keep"),
            basis=bases.Eigh(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
            first_step="update",
        ), **_settings(lr, betas, weight_decay, {"bias_correction": True}, options))


eshampoo = EShampoo


class OneSidedShampoo(Optimizer):
    """One-sided Shampoo, ASGO-style (An et al. 2025; infinity-stars/ASGO defaults): only the smaller side of the
    matrix view gets a factor, ``V ← 0.8 V + 0.2 Gram`` (β₂ = 0.8), its exact inverse root every step (``eigh``
    in place of ASGO's Polar-Express iteration), momentum 0.9, the update rescaled to RMS 0.2, lr 0.01, weight
    decay 0.1 before the update. Vectors get an RMSprop-like diagonal spectrum instead of ASGO's Adam.
    Claim 1: this is the KL fit with the other factor fixed at ``I`` (up to the scalar ``1/D_{-k}``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: Betas = (0.9, 0.8), weight_decay: float = 0.1,
                 eps: float = 1e-10, every: int = 1, max_dim: Optional[int] = 8192, **options: Any) -> None:
        super().__init__(params, Preconditioner(
            structure=structures.OneSided(max_dim=max_dim),
            estimator=estimators.Shampoo(beta=betas[1]),
            basis=bases.Eigh(every=every),
            applier=Normalize(Power(p=0.5, eps=eps), rms=0.2),
        ), **_settings(lr, betas, weight_decay, {}, options))


one_sided_shampoo = OneSidedShampoo


def muon(params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
         weight_decay: float = 0.0, adjust_lr_fn: Literal["original", "match_rms_adamw", "none"] | None = None,
         ns_steps: int = 5, ns_coefficients: Any = (3.4445, -4.7750, 2.0315), ns_dtype: Any = None,
         eps: float = 1e-7, adam_lr: float = 3e-4, adam_betas: Betas = (0.9, 0.95), adam_eps: float = 1e-10,
         adam_weight_decay: float | None = None, adam_params: Iterable[Any] = (), **options: Any) -> Optimizer:
    """Muon (Jordan et al. 2024) with an Adam part for what is not a hidden matrix, in one optimizer.

    **Muon part** (weights with ``ndim ≥ 2``; a conv kernel is viewed ``(out, in·kh·kw)``): ``structures.Matrix`` ·
    ``estimators.Stateless`` · ``bases.Identity`` · ``NewtonSchulz(ns_steps, ns_coefficients, ns_dtype, eps,
    scale)``, the first gradient used at once. As ``torch.optim.Muon``: ``m ← μ m + (1−μ) g``, Nesterov direction
    ``(1−μ) g + μ m``, ``W ← W − η·wd·W`` with the unadjusted ``η``, then ``W ← W − η·s(A, B)·NS(direction)``.
    ``adjust_lr_fn`` names ``s`` (``NewtonSchulz.scale``): ``None`` or ``"original"`` ``√max(1, A/B)`` (Jordan;
    torch's default), ``"match_rms_adamw"`` ``0.2·√max(A, B)`` (Moonlight, Liu et al. 2025), ``"none"`` 1, where
    ``A`` is the first dimension (out) and ``B`` the product of the others. ``ns_dtype`` (default bfloat16, as
    torch) is the precision of the iteration; ``ns_coefficients="polar_express"`` takes Amsel et al.'s table
    (``precond.appliers.newton_schulz.POLAR_EXPRESS``). Defaults are Jordan's reference ``Muon``: lr 0.02,
    momentum 0.95, Nesterov, no weight decay (``torch.optim.Muon`` defaults to lr 1e-3 and weight decay 0.1).

    **Adam part** (vectors, scalars, and whatever ``adam_params`` names): AdamW composed from parts,
    ``structures.Diagonal`` · ``Frobenius(β₂, dense)`` · ``bases.Identity`` · ``Power(½, adam_eps, "outside")``,
    bias-corrected momentum ``β₁``, the first gradient used at once, decay before the update. Defaults are the
    auxiliary Adam of Jordan's ``MuonWithAuxAdam``: lr 3e-4, betas (0.9, 0.95), eps 1e-10; ``adam_weight_decay``
    defaults to ``weight_decay``.

    Routing: embeddings and LM heads are 2-D but belong to Adam, which shapes cannot tell: name them in
    ``adam_params`` (the tensors, or their names when ``params`` is ``model.named_parameters()``), e.g.
    ``precond.muon(model.named_parameters(), adam_params=["embed.weight", "head.weight"])``. ``params`` may be
    param-group dicts: one with ``"use_muon": True`` or ``False`` goes whole to that part (its own keys, e.g.
    ``lr``, override the part's), one without is split as above with its keys applied to both halves. Every group
    keeps ``use_muon`` (e.g. for a schedule). Other keywords (``state_dtype``, ``on_nonfinite``, ``stack``, ...) go
    to :class:`precond.Optimizer`.
    """
    import torch

    from precond.appliers import NewtonSchulz
    from precond.routing import muon_groups

    scale = "original" if adjust_lr_fn is None else adjust_lr_fn
    if scale not in ("original", "match_rms_adamw", "none"):
        raise ValueError(f"adjust_lr_fn must be None or 'original' (√max(1, A/B)), 'match_rms_adamw' (0.2·√max(A, B)) "
                         f"or 'none' (1), got {adjust_lr_fn!r}")
    muon_part = Preconditioner(
        structure=structures.Matrix(),
        estimator=estimators.Stateless(),
        basis=bases.Identity(),
        applier=NewtonSchulz(steps=ns_steps, coefficients=ns_coefficients, eps=eps, scale=scale,
                             dtype=torch.bfloat16 if ns_dtype is None else ns_dtype),
        first_step="update",
    )
    adam_part = Preconditioner(
        structure=structures.Diagonal(),
        estimator=estimators.Frobenius(beta=adam_betas[1], spectrum="dense"),
        basis=bases.Identity(),
        applier=Power(p=0.5, eps=adam_eps, eps_placement="outside"),
        first_step="update",
    )
    adam_settings = {"preconditioner": adam_part, "lr": adam_lr, "momentum": adam_betas[0], "nesterov": False,
                     "bias_correction": True, "decay_order": "before",
                     "weight_decay": weight_decay if adam_weight_decay is None else adam_weight_decay}
    return Optimizer(muon_groups(params, adam_params, adam_settings), preconditioner=muon_part, lr=lr,
                     momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **options)
