"""Variants: a named preset, ``adamw``, or a composition of the four parts written ``key=value,...``.

Grammar (``parse_variant``): comma-separated items; the first may be a bare name (a preset such as
``kl_shampoo``, or ``adamw``), every other item is ``key=value``:

=====================  ==========================================================  =====================
key                    values                                                      composition default
=====================  ==========================================================  =====================
``structure``          ``nmode`` ``kronecker`` ``one_sided`` ``diagonal``          ``nmode``
``max_dim``            a positive integer or ``none``                              4096
``large``              a mode above ``max_dim`` gets ``none`` (identity), a        ``none``
                       ``diagonal`` spectrum, or ``block``: blocks of ``max_dim``
``estimator``          ``kl`` ``shampoo`` ``frobenius`` ``frobenius_factored``     ``kl``
                       ``kl_soap``
``basis``              ``eigh`` ``qr`` ``cholesky_qr`` ``refine``                  ``qr``
                       ``identity``
``every``              T, the refresh period                                       10
``applier``            ``power:<p>``, p = 0.5, 0.25, ``1/(2N)`` or any p in [0, 1]  ``power:0.5``
``normalize``          rescale the update to this RMS (``Normalize``, ASGO: 0.2)   ``none``
``graft``              ``adam`` ``rmsprop`` ``sgd`` ``none``                       ``none``
``beta1``, ``beta2``   momentum β₁ and the estimator's EMA weight β₂               0.9, 0.95
``eps``                the applier's ε                                             1e-8
``weight_decay``       decoupled weight decay                                      the run's setting
``eps_placement``      ``factor`` (λ+ε)^-p or ``outside`` 1/(λ^p+ε)                ``outside``
``bias_correction``    bias-corrected momentum (``true``/``false``)                true for ``frobenius``
``decay_order``        weight decay ``before`` or ``after`` the update             ``after``
``name``               the label in tables and plots                               made from the parts
``lr``                 this variant's learning rates, ``/``-separated: 1e-3/3e-3    the run's grid
``lr_from``            run at the best lr of the variant named here, once tuned    unset
``bracket``            extend the grid until the best lr lies inside (true/false)  true
``why``                why the variant is in the ablation (printed in the summary)  unset
                       (alias ``reason``)
``expect``             ``diverge``: shown to fail (no lr extension, no advice to    unset
                       widen its lrs; the summary says when it did not diverge)
``ns_dtype``           ``muon``'s Newton–Schulz in ``bfloat16`` or ``float32``       ``bfloat16``
``adam_lr``            the Adam part's lr: of ``muon`` and ``torch_muon``, or of    3e-4 (Muons); the
                       the AdamW that ``embeddings=adam`` gives the embeddings      variant's lr
                       and the head (Muon's split with its own lr)
``rotation_dtype``     ``bfloat16`` or ``float16`` operands for the rotations      the state dtype
                       into and out of the eigenbasis (``rotation_dtype`` of
                       ``precond.Optimizer``)
``init_lambda``        KL's λ₀ (estimator ``kl``, ``kl_soap``): a number > 0, or    0.1
                       ``data``, the spectrum of the first filled factor
``floor``              KL's lower bound on λ (estimator ``kl``, ``kl_soap``, or     ``dimension``
                       a KL preset): ``dimension`` (the prototype's clamp),
                       ``product`` (that bound on ``∏_j λ_j``: one-sided KL,
                       modes without a factor) or a number ≥ 0
``basis_power``        the ``qr`` refresh is ``qr(S^p Q)`` (p orthogonal-iteration  1
                       steps, one QR; basis ``qr`` or a QR preset)
``sweeps``             refinement sweeps per refresh (basis ``refine`` only)       2
``plain_passes``       plain Cholesky-QR passes after the shifted one (basis       2
                       ``cholesky_qr64`` only): 1 or 2
``refresh``            a preset's QR refresh (``kl_shampoo``, ``kl_soap``):        ``qr``
                       ``qr`` or ``cholesky_qr64``, the two-pass float64
                       Cholesky-QR (presets only; a composition writes
                       ``basis=cholesky_qr64,plain_passes=1``)
``fold_every``         the estimator folds a gradient every k steps                1
``momentum_in_basis``  the momentum kept rotated into the bases (applier           false
                       ``power``): the same updates up to round-off, one
                       rotation fewer per folding step
``polar``              the applier's direction on matrices replaced by its polar   ``none``
                       factor (``precond.Polar``: Muon's Newton–Schulz after the
                       preconditioner), scaled ``original`` (Jordan's) or
                       ``match_rms_adamw`` (RMS 0.2); compositions only
``polar_dtype``        ``polar``'s iteration in ``bfloat16`` or ``float32``        ``bfloat16``
``track_drift``        KL keeps ``diag(QᵀSQ)`` current (estimator ``kl``,           false
                       ``kl_soap``, or a KL preset), so ``drift_tolerance``
                       checks a basis without a ``d³`` product
``embeddings``         ``adam``: AdamW (0.9, 0.95, 1e-8) for the embeddings and     the variant's parts
                       the output head (the task's ``adam_params``, as Muon);
                       ``one_sided``: the variant's parts on their smaller side
``stagger``,           how ``precond.Optimizer`` runs the step (its keywords of     off; ``tf32``: torch's
``async_refresh``,     the same names, ``true``/``false``): refreshes spread over   global setting
``capture``, ``tf32``, the T steps, on side streams, the step as CUDA graphs,
``drift_tolerance``,   TF32 products, refreshes only of drifted bases, at most
``refresh_budget``     the per-step work of a fixed period B, most drifted first
=====================  ==========================================================  =====================

The part names come from one table, :data:`precond.ablate.catalog.PARTS`.

A preset accepts only hyperparameter keys (``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``every``,
``max_dim``, ``large``, ``bias_correction``, ``decay_order``, ``rotation_dtype``, ``embeddings``, ``fold_every``,
``momentum_in_basis``,
``track_drift`` and ``floor`` (KL presets), ``basis_power`` (QR presets), ``refresh`` (``kl_shampoo``,
``kl_soap``), the speed keys
``stagger``, ``async_refresh``, ``capture``, ``tf32``, ``drift_tolerance``, ``refresh_budget``, and
``graft``/``applier`` where
the preset has them, as ``shampoo``); ``adamw``, the peers (``hb_kl_shampoo``, ``hb_soap``, ``po_soap``,
``torch_muon``) and ``muon`` accept the keys listed in :mod:`precond.ablate.peers`. A composition with every key at
its default is KL-Shampoo as in ``precond.kl_shampoo``.
"""

from __future__ import annotations

import inspect
from typing import Any, Collection, Iterable, Mapping, Optional

import attrs
import torch

import precond
from precond.ablate import catalog, keys, peers
from precond.ablate.keys import format_applier

COMPOSITION_DEFAULTS: dict[str, Any] = {
    "structure": "nmode", "max_dim": 4096, "large": "none", "estimator": "kl", "basis": "qr", "every": 10,
    "applier": 0.5, "normalize": None, "graft": "none", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
    "eps_placement": "outside", "decay_order": "after",
}
"""Defaults of a composition; ``bias_correction`` defaults to true for ``estimator=frobenius`` (SOAP's V is
bias-corrected, so is its momentum) and false otherwise, ``weight_decay`` to the run's setting."""

PRESET_KEYS = ("beta1", "beta2", "eps", "weight_decay", "every", "max_dim", "large", "bias_correction",
               "decay_order", "rotation_dtype", "embeddings", "track_drift", "floor", "fold_every", "momentum_in_basis",
               "basis_power", "refresh", "adam_lr", *keys.SPEED_KEYS)


def preset_keys(preset: str) -> tuple[str, ...]:
    """The keys a named variant accepts (``graft`` and ``applier`` only where the preset takes them)."""
    if preset in peers.PEERS:
        return peers.PEERS[preset].keys
    parameters = inspect.signature(getattr(precond, preset)).parameters
    extra = tuple(key for key, parameter in (("graft", "graft"), ("applier", "p")) if parameter in parameters)
    return PRESET_KEYS + extra


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


def _item(key: str, value: Any) -> str:
    return f"{key}={format_applier(value) if key == 'applier' else _format(value)}"


@attrs.frozen
class Variant:
    """One optimizer of an ablation: ``preset`` (a name in ``keys.NAMED``) with overrides, or a composition
    (``preset is None``) with every key resolved. ``settings`` is the canonical ``(key, value)`` tuple that
    identifies it; ``name`` labels it in reports and ``lrs`` (when given) replaces the run's learning-rate grid.
    ``lr_from`` names another variant whose best learning rate this one runs at (once that one is tuned);
    ``bracket`` ``False`` keeps the grid as given (no extension when the best lr is at its edge);
    ``adam_lr_from`` names the variant whose best learning rate becomes this variant's ``adam_lr`` (a Muon's Adam
    part, or the AdamW that ``embeddings=adam`` gives the embeddings and head, at the lr tuned for AdamW), once that
    one is tuned.
    """

    name: str
    preset: Optional[str]
    settings: tuple[tuple[str, Any], ...]
    lrs: Optional[tuple[float, ...]] = attrs.field(default=None, eq=False)
    lr_from: Optional[str] = attrs.field(default=None, eq=False)
    bracket: bool = attrs.field(default=True, eq=False)
    adam_lr_from: Optional[str] = attrs.field(default=None, eq=False)
    why: Optional[str] = attrs.field(default=None, eq=False)
    """Why the variant is in the ablation (the summary prints it)."""
    expect: Optional[str] = attrs.field(default=None, eq=False)
    """``"diverge"`` for a variant shown to fail (see :mod:`precond.ablate.bracket`)."""

    @property
    def expected_to_diverge(self) -> bool:
        return self.expect == "diverge"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.settings)

    def spec(self) -> str:
        """Canonical text (without ``name`` and ``lr``): ``parse_variant(v.spec())`` builds the same optimizer."""
        items = [self.preset] if self.preset else []
        items += [_item(key, value) for key, value in self.settings]
        return ",".join(items)

    def build(self, params: Iterable[Any], lr: float, weight_decay: Optional[float] = None,
              adam_params: Collection[str] = (), sync_free: bool = False) -> torch.optim.Optimizer:
        """The optimizer over ``params``; ``weight_decay`` is used unless the variant sets its own (``None``:
        the preset's default, 0 for a composition). ``adam_params`` names the matrices a Muon gives to Adam
        (embeddings, head); ``sync_free`` lets our optimizers skip the per-step finiteness check."""
        from precond.ablate.build import build_optimizer

        return build_optimizer(self, params, lr, weight_decay, adam_params=adam_params, sync_free=sync_free)

    @property
    def missing(self) -> Optional[str]:
        """Why this variant cannot be built here (a peer library not installed), or ``None``."""
        return peers.missing(self.preset)


def parse_variant(text: str) -> Variant:
    """Read a variant from ``kl_shampoo``, ``shampoo,graft=none,name=shampoo (no graft)`` or
    ``estimator=kl,basis=eigh,every=10,applier=power:0.5``; raises ``ValueError`` naming the bad part."""
    return variant_from_mapping(split_variant(text), source=text)


def split_variant(text: str) -> dict[str, str]:
    """The raw ``{key: value}`` items of a variant text (keys normalised, values unchecked); a leading bare
    name becomes ``preset``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty variant; give a name ({', '.join(keys.NAMED)}) or key=value items "
                         f"with keys {', '.join(keys.READERS)}")
    raw: dict[str, str] = {}
    for position, item in enumerate(part.strip() for part in text.split(",")):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals:
            if position != 0:
                raise ValueError(f"variant {text!r}: item {item!r} is not key=value (only the first item may be a bare "
                                 f"name: {', '.join(keys.NAMED)})")
            key, value = "preset", item
        key = normalize_key(key)
        if key in raw:
            raise ValueError(f"variant {text!r}: key {key!r} is given twice")
        raw[key] = value.strip()
    return raw


def normalize_key(key: str) -> str:
    """Lower case, ``-`` read as ``_``, aliases (``lrs``, ``wd``) resolved."""
    key = str(key).strip().lower().replace("-", "_")
    return keys.ALIASES.get(key, key)


def variant_from_mapping(raw: Mapping[str, Any], source: Optional[str] = None) -> Variant:
    """A variant from a mapping of keys to values (strings or TOML values); ``source`` names it in errors."""
    where = f"variant {source!r}" if source is not None else f"variant {dict(raw)!r}"
    values: dict[str, Any] = {}
    for raw_key, raw_value in raw.items():
        key = normalize_key(raw_key)
        reader = keys.READERS.get(key) or keys.LABEL_KEYS.get(key)
        if reader is None:
            raise ValueError(f"{where}: unknown key {raw_key!r}; allowed keys: "
                             f"{', '.join([*keys.READERS, *keys.LABEL_KEYS])}")
        if key in values:
            raise ValueError(f"{where}: key {key!r} is given twice")
        try:
            values[key] = reader(raw_value)
        except ValueError as error:
            if key == "preset":
                raise ValueError(f"{where}: unknown variant name {raw_value!r}; the named variants are "
                                 f"{', '.join(keys.NAMED)}, and a composition is written key=value,... with keys "
                                 f"{', '.join(keys.READERS)}") from None
            raise ValueError(f"{where}: bad {key}: {error}") from None
    label, lrs, preset = values.pop("name", None), values.pop("lr", None), values.pop("preset", None)
    lr_from, bracket = values.pop("lr_from", None), values.pop("bracket", True)
    adam_lr_from = values.pop("adam_lr_from", None)
    _check_lr_sources(values, preset, lrs is not None, lr_from, adam_lr_from, where)
    extra = {"lr_from": lr_from, "bracket": bracket, "adam_lr_from": adam_lr_from, "why": values.pop("why", None),
             "expect": values.pop("expect", None)}
    if preset is not None:
        allowed = preset_keys(preset)
        refused = [key for key in values if key not in allowed]
        if refused:
            raise ValueError(f"{where}: {', '.join(refused)} cannot be changed on the named variant {preset!r}; it "
                             f"accepts {', '.join(allowed)}. Write a composition (estimator=...,basis=...) "
                             "to change its parts")
        settings = tuple((key, values[key]) for key in keys.READERS if key in values)
        return Variant(label or _preset_label(preset, settings), preset, settings, lrs, **extra)
    _check_named_only_keys(values, where)
    resolved = {**COMPOSITION_DEFAULTS, "bias_correction": values.get("estimator", "kl") == "frobenius", **values}
    _check_kl_keys(values, resolved["estimator"], where)
    _check_basis_keys(values, resolved["basis"], where)
    _check_polar_keys(values, where)
    settings = tuple((key, resolved[key]) for key in keys.READERS if key in resolved)
    return Variant(label or _composition_label(resolved, values), None, settings, lrs, **extra)


BASIS_KEYS = {"basis_power": ("qr", "the number of products of S in the qr refresh (bases.QRPowerStep)"),
              "sweeps": ("refine", "the number of refinement sweeps of bases.Refine"),
              "plain_passes": ("cholesky_qr64", "the number of plain Cholesky-QR passes of the float64 refresh")}
"""Keys that belong to one basis: the basis, and what the key is."""


def _check_basis_keys(values: Mapping[str, Any], basis: str, where: str) -> None:
    """``basis_power`` belongs to basis ``qr``, ``sweeps`` to basis ``refine``, ``plain_passes`` to basis
    ``cholesky_qr64``."""
    for key, (owner, meaning) in BASIS_KEYS.items():
        if key in values and basis != owner:
            raise ValueError(f"{where}: {key} is {meaning} and belongs to basis {owner}, not to basis {basis}")


def _check_lr_sources(values: Mapping[str, Any], preset: Optional[str], own_lrs: bool, lr_from: Optional[str],
                      adam_lr_from: Optional[str], where: str) -> None:
    """A variant's lr comes from its own grid or from ``lr_from``; its Adam part's from ``adam_lr`` or from
    ``adam_lr_from``, and only where it has an Adam part."""
    if lr_from is not None and own_lrs:
        raise ValueError(f"{where}: give lr (its own grid) or lr_from (the best lr of another variant), not both")
    if adam_lr_from is not None and ("adam_lr" in values or lr_from is not None):
        raise ValueError(f"{where}: adam_lr_from sets the variant's adam_lr (which then tunes its own lr); give it or "
                         f"adam_lr, not both, and not with lr_from")
    if preset not in peers.PEERS:
        _check_adam_lr_keys(values, adam_lr_from, where)
    elif adam_lr_from is not None and "adam_lr" not in peers.PEERS[preset].keys:
        raise ValueError(f"{where}: adam_lr_from sets the lr of an Adam part, and {preset} has none (muon and "
                         "torch_muon have one, and so does a variant with embeddings=adam)")


COMPOSITION_REFUSES: dict[str, str] = {
    "ns_dtype": "belongs to muon only, not to a composition (a composition's Newton–Schulz is polar's: polar_dtype)",
    "refresh": "chooses the basis refresh of a preset (kl_shampoo,refresh=cholesky_qr64); a composition names its "
               "basis: write basis=cholesky_qr64,plain_passes=1 (the presets' two-pass float64 refresh) or basis=qr, "
               "and leave refresh out",
}
"""Keys that only named variants take, and why a composition refuses each: ``ns_dtype`` is ``muon``'s (a
composition's Newton–Schulz is ``polar``'s); ``refresh`` chooses a preset's basis refresh, and a composition names
its basis itself (``basis=cholesky_qr64`` with ``plain_passes=1`` is what ``kl_shampoo,refresh=cholesky_qr64`` gets),
so two names cannot disagree."""


def _check_named_only_keys(values: Mapping[str, Any], where: str) -> None:
    """A composition refuses the keys of :data:`COMPOSITION_REFUSES`, with the reason."""
    for key in values:
        if key in COMPOSITION_REFUSES:
            raise ValueError(f"{where}: {key} {COMPOSITION_REFUSES[key]}")


def _check_adam_lr_keys(values: Mapping[str, Any], adam_lr_from: Optional[str], where: str) -> None:
    """``adam_lr`` (or ``adam_lr_from``) of a preset or a composition is the lr of the AdamW that ``embeddings=adam``
    gives the embeddings and the head, so it needs that key (Muon's split, with its Adam part at its own lr)."""
    if ("adam_lr" in values or adam_lr_from is not None) and values.get("embeddings") != "adam":
        given = "adam_lr" if "adam_lr" in values else "adam_lr_from"
        raise ValueError(f"{where}: {given} sets the lr of an Adam part: muon's, or the AdamW that embeddings=adam "
                         "gives the embeddings and the output head, and this variant has neither: add "
                         "embeddings=adam, or leave it out")


def _check_polar_keys(values: Mapping[str, Any], where: str) -> None:
    """``polar_dtype`` belongs to a variant whose ``polar`` names a scale."""
    if "polar_dtype" in values and values.get("polar", "none") == "none":
        raise ValueError(f"{where}: polar_dtype is the dtype of polar's Newton–Schulz iteration, and this variant has "
                         "none: add polar=original or polar=match_rms_adamw, or leave polar_dtype out")


def _check_kl_keys(values: Mapping[str, Any], estimator: str, where: str) -> None:
    """``init_lambda``, ``floor`` and ``track_drift`` belong to the KL estimators only."""
    for key, meaning in (("init_lambda", "KL's λ₀"), ("floor", "KL's lower bound on λ"),
                         ("track_drift", "KL's tracked diag(QᵀSQ)")):
        if key in values and estimator not in catalog.KL_ESTIMATORS:
            raise ValueError(f"{where}: {key} is {meaning} and belongs to estimator "
                             f"{' or '.join(catalog.KL_ESTIMATORS)}, not to estimator {estimator}")


def _preset_label(preset: str, settings: tuple[tuple[str, Any], ...]) -> str:
    if not settings:
        return preset
    return f"{preset}({', '.join(_item(key, value) for key, value in settings)})"


def _composition_label(resolved: Mapping[str, Any], given: Mapping[str, Any]) -> str:
    """A short label: ``kl qr10 p=0.5`` plus every other key that was given and differs from its default."""
    basis = resolved["basis"] if resolved["basis"] == "identity" else f"{resolved['basis']}{resolved['every']}"
    p = resolved["applier"]
    words = [resolved["estimator"], basis, f"p={p if isinstance(p, str) else format(p, 'g')}"]
    if resolved["structure"] != "nmode":
        words.insert(0, resolved["structure"])
    defaults = {**COMPOSITION_DEFAULTS, "bias_correction": resolved["estimator"] == "frobenius"}
    shown = {"structure", "estimator", "basis", "every", "applier"}
    words += [f"{key}={_format(value)}" for key, value in given.items()
              if key not in shown and (key not in defaults or value != defaults[key])]
    return " ".join(words)
