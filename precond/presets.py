"""Named optimizers, each a few lines of composition of the four parts.

Each preset is a class, a ``torch.optim.Optimizer`` (a :class:`precond.Optimizer` whose constructor builds the
preset's preconditioner): ``KLShampoo``, ``IdealizedKLShampoo``, ``KLSOAP``, ``Shampoo``, ``SOAP``, ``EShampoo``,
``OneSidedShampoo``, ``Muon``. Clients that take an optimizer class (Hugging Face's ``optimizer_cls_and_kwargs``)
build it with their own param groups, and reprs and logs name the method. The lower-case names (``kl_shampoo``, …,
``muon``) are the same classes under the names of the first release. ``kfac`` and ``ekfac`` take the model and are
functions.

Every preset but ``Muon`` (two parts, its own keywords) takes ``params, lr, betas=(β₁, β₂), weight_decay, eps,
every (T), max_dim``, ``first_step`` and ``order`` (the preconditioner's; see :class:`precond.Preconditioner`),
``large`` (its structure's: what a mode above ``max_dim`` gets; ``large="block"`` cuts it into blocks of ``max_dim``
with factors of their own, as Meta's Distributed Shampoo, see ``precond.blocking``) and passes any other keyword
(``nesterov``, ``decay_order``, ``bias_correction``, ``state_dtype``, ``on_nonfinite``, ``stagger``, ``capture``,
``rotation_dtype``, …) to :class:`precond.Optimizer`. ``β₁`` is the optimizer's momentum, ``β₂`` the estimator's
EMA weight ρ.
All use ``NMode`` by default, so conv kernels and 3-D (MoE, stacked) weights get one factor per mode; a mode
above ``max_dim`` is left without a dense factor (embeddings and LM heads work: only their small side is
preconditioned), and a vector parameter (bias, norm scale) gets a diagonal spectrum.

Embeddings and the output head are preconditioned like any matrix by default (Muon's preset alone gives them to
Adam, as its authors do). To give them AdamW instead, put them in a group of their own with :func:`adam_group`'s
keys. On a 25.6M byte-level GPT (vocabulary 256, so both of their modes have factors) that changed KL-Shampoo's
final loss by −0.0014 (not significant, 2 seeds) and its step time by −1.7 and +0.8 ms on two H100 machines
(``docs/benchmarks.md``, "The race after the drift levers"), so the default stays the method as published; at a
GPT-2 vocabulary (50257 > ``max_dim``) their vocabulary side has no factor anyway.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional

import torch

import bases
import estimators
import structures
from precond.appliers import Exponent, Graft, NewtonSchulz, Normalize, Power
from precond.optimizer import Optimizer
from precond.param_groups import params_list
from precond.preconditioner import Preconditioner
from precond.preset_options import Betas, optimizer_settings, with_options, with_refresh
from precond.routing import muon_groups


def adam_part(beta2: float, eps: float) -> Preconditioner:
    """Adam composed from parts (the mixed presets' part for what is not a hidden matrix or hooked layer):
    ``structures.Diagonal`` · ``Frobenius(β₂, dense)`` · ``bases.Identity`` · ``Power(½, ε, "outside")``, the first
    gradient used at once; momentum and bias correction are the group's."""
    return Preconditioner(
        structure=structures.Diagonal(),
        estimator=estimators.Frobenius(beta=beta2, spectrum="dense"),
        basis=bases.Identity(),
        applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        first_step="update",
    )


def adam_group(betas: Betas, eps: float) -> dict[str, Any]:
    """The group keys of an AdamW group inside a ``precond.Optimizer`` (Muon's Adam half, the workbench's
    ``embeddings=adam``): :func:`adam_part`, momentum β₁ without Nesterov, bias-corrected, weight decay before the
    update, as ``torch.optim.AdamW``."""
    return {"preconditioner": adam_part(betas[1], eps), "momentum": betas[0], "nesterov": False,
            "bias_correction": True, "decay_order": "before"}


class KLShampoo(Optimizer):
    """KL-Shampoo (Lin et al. 2025, Fig. 3 right), without grafting, for weights of any order.

    ``KL(β₂)`` factors and λ-EMA in the stale basis · ``eigh`` once, then ``QRPowerStep`` every T = 10 steps (no
    sort) · ``Power(½)`` with ε outside the root. Defaults of the authors' prototype (yorkerlin/KL-Methods
    ``KLOpt``): λ₀ = 0.1, the clamp ``λ ≥ max(10, min(d_k, 4000))^{-2}``, a first step that only fills the
    statistics, no bias correction, decoupled weight decay after the update.

    ``refresh="cholesky_qr64"`` (default ``"qr"``) refreshes with the two-pass float64 shifted Cholesky-QR
    (``bases.CholeskyQR(every, precision="float64", plain_passes=1)``, :func:`with_refresh`): Householder QR's basis
    to float32 round-off from products, Cholesky factorisations and triangular solves. On an H100 the budgeted step
    at a 25.6M GPT's shapes went from 16.3 to 10.1 ms, and GPT-2 small's (T = 10) from 109.9 to 94.3 ms with its
    final loss kept (paired Δ +0.0006 [−0.0040, +0.0053], 2 seeds). Slow on GPUs whose float64 runs at 1/32–1/64
    of float32 (consumer cards).
    """

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: Betas = (0.9, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.KL(beta=betas[1]),
            basis=bases.QRPowerStep(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        )), **optimizer_settings(lr, betas, weight_decay, {"decay_order": "after"}, options))


kl_shampoo = KLShampoo


class IdealizedKLShampoo(Optimizer):
    """Idealized KL-Shampoo (Lin et al. 2025, Eq. 4 and Fig. 3 left): ``Q_k, λ_k = eigh(S_k)`` after every update,
    so ``P_j = S_j^{-1}`` exactly; with ``1/D_{-k}`` and the ½ root at any order (no published code has both)."""

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: Betas = (0.9, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, every: int = 1, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.KL(beta=betas[1], init_lambda=None, refresh_spectrum="reset"),
            basis=bases.Eigh(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        )), **optimizer_settings(lr, betas, weight_decay, {"decay_order": "after"}, options))


idealized_kl_shampoo = IdealizedKLShampoo


class KLSOAP(Optimizer):
    """KL-SOAP (KL-Methods ``KLOpt(using_klsoap=True)``): KL factors (their λ only feed ``Δ_k``) and Adam in the
    eigenbasis, ``V`` neither bias-corrected nor permuted, QR every T = 10 steps without sorting.
    ``refresh="cholesky_qr64"``: the same basis from the two-pass float64 Cholesky-QR refresh (:func:`with_refresh`;
    fast on GPUs with fast float64, slow on consumer cards)."""

    def __init__(self, params: Iterable[Any], lr: float = 3e-4, betas: Betas = (0.9, 0.95), weight_decay: float = 0.0,
                 eps: float = 1e-8, every: int = 10, max_dim: Optional[int] = 4096, **options: Any) -> None:
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.DenseSpectrum(estimators.KL(beta=betas[1]), beta=betas[1], bias_correction=False,
                                               transport="keep"),
            basis=bases.QRPowerStep(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        )), **optimizer_settings(lr, betas, weight_decay, {"decay_order": "after"}, options))


kl_soap = KLSOAP


class Shampoo(Optimizer):
    """Shampoo as in the widely used implementation (Shi et al. 2023, Meta's Distributed Shampoo).

    ``Shampoo(β₂)`` grams · ``Eigh`` every T = 10 steps (the seed paper's setting; stale roots in between) ·
    ``Power(p)`` with ε (1e-12) added to each eigenvalue · grafted onto Adam (β 0.999, ε 1e-10) per parameter ·
    bias-corrected momentum, decoupled weight decay before the update. ``p = 1/2`` is Shampoo² (default);
    ``p = "1/(2N)"`` (1/4 for a matrix) the original; ``graft=None`` the ungrafted method of Fig. 1.
    Unlike Meta's, this preset keeps the factors uncorrected, grafts from the first update (no Adam warm-up) and
    preconditions before folding; Meta's factor bias correction (``use_bias_correction=True``) is the estimator
    ``estimators.Shampoo(bias_correction=True)``, and Meta's whole step the composition of ``docs/conventions.md``
    ("Composing a reference"), checked against Meta's update by ``tests/test_conventions.py``.

    ``floor="roundoff"`` (default; :class:`precond.Power`) raises each ``λ_k`` to ``d_k·u·max λ_k``, the round-off
    of a float32 ``eigh``: below it an eigenvalue is noise, often 0 after the clip, and ``(0 + 1e-12)^{-½} = 10⁶``
    would scale the ``~1e-7·|G|`` that every gradient leaks into untouched directions up to the size of the real
    update (grafting then keeps the norm, but more than half the update pointed at noise, and a rank-deficient
    regression stalled at 1e-2 of its loss where float64 reached 5e-8). ``floor=0`` keeps Meta's exact
    ``(λ + ε)^{-p}``.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Betas = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-12, every: int = 10, max_dim: Optional[int] = 4096, p: Exponent = 0.5,
                 graft: Optional[Literal["adam", "rmsprop", "sgd"]] = "adam",
                 floor: float | Literal["roundoff"] = "roundoff", **options: Any) -> None:
        applier = Power(p=p, eps=eps, floor=floor)
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Shampoo(beta=betas[1]),
            basis=bases.Eigh(every=every),
            applier=Graft(applier, onto=graft) if graft else applier,
        )), **optimizer_settings(lr, betas, weight_decay, {"bias_correction": True}, options))


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
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Frobenius(beta=betas[1], spectrum="dense"),
            basis=bases.QRPowerStep(every=every, sort=True),
            applier=Power(p=0.5, eps=eps, eps_placement="outside"),
        )), **optimizer_settings(lr, betas, weight_decay, {"bias_correction": True, "decay_order": "after"}, options))


soap = SOAP


class EShampoo(Optimizer):
    """Eigenvalue-corrected Shampoo (Eschenhagen et al. 2025; Meta's ``EigenvalueCorrectedShampooPreconditionerList``).

    Grams and a bias-corrected ``V`` in the eigenbasis (ρ = β₂ = 0.999), ``V`` not carried across refreshes ·
    exact ``eigh`` every T = 100 steps (Meta's README) · ``R/(√V̂ + ε)``, ε = 1e-12 · the first gradient is used at
    once (no fill-only step), bias-corrected momentum, decoupled weight decay before the update.

    ``floor="roundoff"`` (default; :class:`precond.Power`) raises ``V̂`` to ``(u·Σ_k d_k)²·max V̂``, the round-off
    of its own entries. Why: ``Q`` from a float32 ``eigh`` is orthogonal only to ``~d·u`` (u = 1.2e-7) and each
    entry of ``R = G ×_k Q_k`` sums ``d`` rounded products, so a direction that no gradient touched still gets
    ``~1e-7·|G|`` of every gradient; its ``V̂`` is that round-off squared, or exactly 0, and ``R/(√V̂ + 1e-12)``
    divides one rounding error by another or by ε: update entries up to ``1e-7·|G|/ε``. On a 32×384 weight whose
    gradients share a 32-dimensional row space the update RMS was 2e4 × lr (SOAP's ε = 1e-8: 2.7 × lr). A larger ε
    only moves the threshold (SOAP's amplification grows with ``|G|/ε`` too); the floor is scale-free and leaves
    every entry above round-off as it is. ``floor=0`` is Meta's exact update, and
    ``precond.eshampoo(..., floor=0, state_dtype=torch.float64)`` the reference computation (in float64 the floor
    still acts on entries that are round-off, e.g. the off-diagonal of ``R₁ = Q_Lᵀ G₁ Q_R``, diagonal in exact
    arithmetic at the first step).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Betas = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-12, every: int = 100, max_dim: Optional[int] = 4096,
                 floor: float | Literal["roundoff"] = "roundoff", **options: Any) -> None:
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.NMode(max_dim=max_dim),
            estimator=estimators.Frobenius(beta=betas[1], spectrum="dense", transport="keep"),
            basis=bases.Eigh(every=every),
            applier=Power(p=0.5, eps=eps, eps_placement="outside", floor=floor),
            first_step="update",
        )), **optimizer_settings(lr, betas, weight_decay, {"bias_correction": True}, options))


eshampoo = EShampoo


class OneSidedShampoo(Optimizer):
    """One-sided Shampoo, ASGO-style (An et al. 2025; infinity-stars/ASGO defaults): only the smaller side of the
    matrix view gets a factor, ``V ← 0.8 V + 0.2 Gram`` (β₂ = 0.8), its exact inverse root every step (``eigh``
    in place of ASGO's Polar-Express iteration), momentum 0.9, the update rescaled to RMS 0.2, lr 0.01, weight
    decay 0.1 before the update. Vectors get an RMSprop-like diagonal spectrum instead of ASGO's Adam.
    Claim 1: this is the KL fit with the other factor fixed at ``I`` (up to the scalar ``1/D_{-k}``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: Betas = (0.9, 0.8), weight_decay: float = 0.1,
                 eps: float = 1e-10, every: int = 1, max_dim: Optional[int] = 8192, **options: Any) -> None:
        super().__init__(params, with_options(options, Preconditioner(
            structure=structures.OneSided(max_dim=max_dim),
            estimator=estimators.Shampoo(beta=betas[1]),
            basis=bases.Eigh(every=every),
            applier=Normalize(Power(p=0.5, eps=eps), rms=0.2),
        )), **optimizer_settings(lr, betas, weight_decay, {}, options))


one_sided_shampoo = OneSidedShampoo


class Muon(Optimizer):
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
    keeps ``use_muon`` (e.g. for a schedule). A group split in two this way becomes two param groups (the Muon half
    first), so ``param_groups`` may hold more groups than were given. Other keywords (``state_dtype``,
    ``on_nonfinite``, ``stack``, ...) go to :class:`precond.Optimizer`.

    ``Muon`` is a class (``precond.muon`` is the same class), so clients that build an optimizer from a class and
    their own param groups (Hugging Face's ``Trainer(optimizer_cls_and_kwargs=(precond.Muon, {...}))``) get the same
    routing; :meth:`add_param_group` routes a group added later as construction does.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, adjust_lr_fn: Literal["original", "match_rms_adamw", "none"] | None = None,
                 ns_steps: int = 5, ns_coefficients: Any = (3.4445, -4.7750, 2.0315), ns_dtype: Any = None,
                 eps: float = 1e-7, adam_lr: float = 3e-4, adam_betas: Betas = (0.9, 0.95), adam_eps: float = 1e-10,
                 adam_weight_decay: float | None = None, adam_params: Iterable[Any] = (), **options: Any) -> None:
        scale = "original" if adjust_lr_fn is None else adjust_lr_fn
        if scale not in ("original", "match_rms_adamw", "none"):
            raise ValueError(f"adjust_lr_fn must be None or 'original' (√max(1, A/B)), 'match_rms_adamw' "
                             f"(0.2·√max(A, B)) or 'none' (1), got {adjust_lr_fn!r}")
        muon_part = Preconditioner(
            structure=structures.Matrix(),
            estimator=estimators.Stateless(),
            basis=bases.Identity(),
            applier=NewtonSchulz(steps=ns_steps, coefficients=ns_coefficients, eps=eps, scale=scale,
                                 dtype=torch.bfloat16 if ns_dtype is None else ns_dtype),
            first_step="update",
        )
        if "refresh" in options:  # always refused, with the reason: Muon's basis is the identity, no QR refresh
            with_refresh(muon_part.basis, options.pop("refresh"))
        self._adam_settings = {**adam_group(adam_betas, adam_eps), "lr": adam_lr,
                               "weight_decay": weight_decay if adam_weight_decay is None else adam_weight_decay}
        self._adam_params = [adam_params] if isinstance(adam_params, torch.Tensor) else list(adam_params)
        groups = muon_groups(params_list(params), self._adam_params, self._adam_settings)
        super().__init__(groups, preconditioner=muon_part, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Route ``param_group`` as construction does, then add it (:meth:`precond.Optimizer.add_param_group`).

        A group with ``"use_muon"`` goes whole to that part; one without is split: matrices (``ndim ≥ 2``) not in
        the constructor's ``adam_params`` to Newton–Schulz, vectors, scalars and ``adam_params`` to the Adam part
        with its settings (the group's own keys, e.g. ``lr``, override them). So Lightning's
        ``BackboneFinetuning``, which adds the unfrozen backbone as ``{"params": [...], "lr": ...}``, gets its
        biases and norm scales stepped by Adam. A split group becomes two param groups (the Newton–Schulz half
        first, each with ``use_muon``); if either is refused, neither is added. ``adam_params`` names must name
        parameters given at construction, so an embedding or head that joins later goes to Adam when its tensor
        was in ``adam_params``, or in a group of its own with ``"use_muon": False``.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        param_group = {**param_group, "params": params_list(param_group["params"], "a param group's 'params'")}
        halves = muon_groups([param_group], self._adam_params, self._adam_settings, other_names=True)
        count = len(self.param_groups)
        try:
            for half in halves:
                super().add_param_group(half)
        except BaseException:
            del self.param_groups[count:]  # the half added before the refused one
            raise

    def __getstate__(self) -> dict[str, Any]:
        """As :class:`precond.Optimizer`, plus the routing of groups added later (the Adam part's settings and
        ``adam_params``), so a copy routes as the original."""
        return {**super().__getstate__(), "adam_settings": self._adam_settings, "adam_params": self._adam_params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._adam_settings = state.pop("adam_settings", getattr(self, "_adam_settings", None))
        self._adam_params = state.pop("adam_params", getattr(self, "_adam_params", []))
        super().__setstate__(state)


muon = Muon


# --- K-FAC and EKFAC: presets that take the model, whose layers they hook --------------------------------------
def _kfac_optimizer(model: Any, estimator_of: Any, lr: float, damping: float, every: int, factor_every: int,
                    momentum: float, weight_decay: float, reduction: str, loss_terms: Any, max_dim: Optional[int],
                    adam_betas: Betas, adam_eps: float, adam_lr: Optional[float], options: dict[str, Any]) -> Optimizer:
    """One optimizer: the hooked layers' weights and biases get ``estimator_of(capture)`` with ``Power(1)`` and the
    damping added to the product of the Kronecker eigenvalues; every other trainable parameter an Adam part."""
    from precond.kfac_capture import KFACCapture

    structure, basis = structures.LayerMatrix(max_dim=max_dim), bases.Eigh(every=every)  # refused before any hook
    if "refresh" in options:  # always refused, with the reason: K-FAC's basis is Eigh, no QR refresh to choose
        with_refresh(basis, options.pop("refresh"))
    applier = Power(p=1.0, eps=damping, eps_placement="outside")
    adam = adam_part(adam_betas[1], adam_eps)
    capture = KFACCapture(model, reduction=reduction, loss_terms=loss_terms, factor_every=factor_every)
    try:
        preconditioner = Preconditioner(structure=structure, estimator=estimator_of(capture), basis=basis,
                                        applier=applier, first_step="update")
        captured = {id(p) for p in capture.params}
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        layers = [(name, p) for name, p in named if id(p) in captured]
        rest = [(name, p) for name, p in named if id(p) not in captured]
        groups: list[dict[str, Any]] = [{"params": layers}] if layers else []
        if rest:
            groups.append({"params": rest, "preconditioner": adam, "momentum": adam_betas[0],
                           "lr": lr if adam_lr is None else adam_lr})
        optimizer = Optimizer(groups, preconditioner=preconditioner, lr=lr, momentum=momentum,
                              weight_decay=weight_decay, **{"bias_correction": True, **options})
        capture.attach(optimizer)  # also refuses what cannot be averaged over the ranks of a data-parallel run
    except Exception:
        capture.remove()
        raise
    optimizer.kfac_capture = capture
    return optimizer


def kfac(model: Any, lr: float = 1e-2, damping: float = 1e-3, beta: float = 0.95, every: int = 1,
         factor_every: int = 1, momentum: float = 0.9, weight_decay: float = 0.0, reduction: str = "mean",
         loss_terms: Any = "batch", max_dim: Optional[int] = 4096, adam_betas: Betas = (0.9, 0.999),
         adam_eps: float = 1e-8, adam_lr: Optional[float] = None, **options: Any) -> Optimizer:
    """K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for ``Conv2d``) for ``model``'s ``nn.Linear`` and
    ``nn.Conv2d`` layers, with an Adam part for every other parameter, in one optimizer.

    A :class:`precond.KFACCapture` hooks the layers (``optimizer.kfac_capture``; evaluate under ``torch.no_grad()``
    or ``capture.paused()``); per layer ``S_A ← β S_A + (1−β) E[aaᵀ]`` and ``S_G ← β S_G + (1−β) E[ggᵀ]`` from
    ``S = I`` (``estimators.KFAC``), the weight viewed as ``(out, fan_in)`` (``structures.LayerMatrix``; the bias is
    preconditioned by ``S_G`` alone), ``Q, λ = eigh(S)``, and the step ``(S_G ⊗ S_A + damping·I)⁻¹ ∇w``
    (``Power(p=1)``, damping added to the product of the eigenvalues).

    - ``factor_every``: the factor update frequency (statistics recorded and folded every that many steps);
      ``every``: the eigendecomposition frequency (``bases.Eigh(every)``). Both 1, ``damping = 1e-3`` and
      ``beta = 0.95`` are kfac-pytorch's defaults (``factor_update_steps``, ``inv_update_steps``, ``damping``,
      ``factor_decay``).
    - ``reduction``/``loss_terms``: how the training loss is reduced, which fixes the scale of ``G``
      (:mod:`precond.kfac_capture`; curvlinops' convention).
    - ``momentum`` β₁ is the optimizer's EMA of the raw gradient (bias-corrected), preconditioned afterwards;
      weight decay is decoupled. ``lr = 1e-2`` is not a reference default (kfac-pytorch leaves the step to the
      user's SGD, whose heavy-ball momentum scales it by ``1/(1−β₁)``).
    - Not reproduced: kfac-pytorch's KL clipping of the update; a gradient is preconditioned with the bases of the
      previous refresh (precond's step order: update, then fold and refresh), not with factors that already hold it.
    - Parameters of other modules, and of grouped convolutions or tied layers (``capture.skipped`` says which),
      get Adam (``adam_betas``, ``adam_eps``, ``adam_lr``, default ``lr``). A mode above ``max_dim`` keeps a
      diagonal factor.
    - Data-parallel training (DDP, with or without ``distributed=precond.DataParallel(...)``): the capture averages
      each step's ``A_t``, ``G_t`` over the ranks (one all-reduce at the start of ``step()``, as kfac-pytorch), so
      the factors are those of the global batch. Its process group: the ``DataParallel``'s, else the DDP-wrapped
      ``model``'s, else the default group when ``torch.distributed`` is initialised; set
      ``optimizer.kfac_capture.group`` (``"local"``: no averaging) before the first step to choose another
      (:mod:`precond.kfac_capture`).
    """
    return _kfac_optimizer(model, lambda capture: estimators.KFAC(capture, beta=beta), lr, damping, every,
                           factor_every, momentum, weight_decay, reduction, loss_terms, max_dim, adam_betas, adam_eps,
                           adam_lr, options)


def ekfac(model: Any, lr: float = 1e-2, damping: float = 1e-3, beta: float = 0.95, every: int = 1,
          factor_every: int = 1, spectrum_beta: Optional[float] = None, moment: str = "per_example",
          momentum: float = 0.9, weight_decay: float = 0.0, reduction: str = "mean", loss_terms: Any = "batch",
          max_dim: Optional[int] = 4096, adam_betas: Betas = (0.9, 0.999), adam_eps: float = 1e-8,
          adam_lr: Optional[float] = None, **options: Any) -> Optimizer:
    """EKFAC (George et al. 2018): :func:`kfac`'s factors and eigenbasis, with the Kronecker spectrum replaced by a
    running average ``V`` (EMA ``spectrum_beta``, default ``beta``) of the squared gradient in that basis, reset to
    ``λ_G ⊗ λ_A`` at every eigendecomposition (``estimators.EKFAC``); the step is ``Q (R ⊘ (V + damping)) Qᵀ``.
    ``moment="per_example"`` averages the per-example squared gradients (the paper's ``diag(Qᵀ F Q)``; the
    per-example gradients of a ``Conv2d`` cost ``batch × out × fan_in`` memory), ``"batch"`` the step's gradient
    squared times the loss terms ``m`` (EKFAC-pytorch's running-average form). Other arguments as :func:`kfac`.
    In data-parallel training the per-example moments are averaged over the ranks as the factors are, and ``m`` of
    ``"batch"`` is the global count; ``DataParallel(mode="owner")``, where only a layer's owner keeps its bases,
    refuses ``"per_example"`` (use ``"batch"`` or ``mode="replicate"``).
    """
    return _kfac_optimizer(
        model, lambda capture: estimators.EKFAC(capture, beta=beta, spectrum_beta=spectrum_beta, moment=moment),
        lr, damping, every, factor_every, momentum, weight_decay, reduction, loss_terms, max_dim, adam_betas,
        adam_eps, adam_lr, options)
