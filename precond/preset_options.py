"""The keywords every preset shares and the parts they reach: :func:`optimizer_settings` (the optimizer's keywords
of a preset) and :func:`with_options` (its preconditioner with the caller's structure, estimator, basis and
preconditioner keywords), and the part editors they use, :func:`with_basis_power`, :func:`with_refresh` and
:func:`with_kl_fields`.
The presets themselves are in :mod:`precond.presets`."""

from __future__ import annotations

from typing import Any

import attrs

import bases
import estimators
from precond import compatibility
from precond.preconditioner import Preconditioner

Betas = tuple[float, float]


_PRECONDITIONER_OPTIONS = ("first_step", "order", "fold_every", "momentum_in_basis")
"""Keywords every preset accepts for its preconditioner rather than the optimizer: ``first_step="update"`` (use the
first gradient at once, as Meta's Shampoo), ``order="fold_then_apply"`` (Meta's step order), ``fold_every=k``
(the statistics updated every ``k`` steps) and ``momentum_in_basis=True`` (the momentum kept in the eigenbases:
the same updates up to round-off, one rotation fewer per folding step; presets whose applier is ``Power``)."""

_ESTIMATOR_OPTIONS = ("track_drift", "floor")
"""Keywords the presets with a KL estimator accept for it: ``track_drift=True`` (``estimators.KL``: keep
``diag(Q_kᵀ S_k Q_k)`` current, so that ``drift_tolerance`` checks a basis without a ``d³`` product) and ``floor``
(``"dimension"``, the prototype's clamp; ``"product"``, the same bound on the product of every mode's λ, for
weights with a mode that gets no factor; or a number)."""

_BASIS_OPTIONS = ("basis_power", "refresh")
"""Keywords the presets whose basis is a ``QRPowerStep`` accept for it: ``basis_power=p`` (each refresh is
``qr(S^p Q)``: ``p`` steps of orthogonal iteration for one QR, ``bases.QRPowerStep``'s ``power``) and ``refresh``
(:data:`REFRESHES`: ``"qr"``, the QR power step, or ``"cholesky_qr64"``, the same basis from the two-pass float64
Cholesky-QR refresh ``bases.CholeskyQR``; unsorted QR power steps only: ``kl_shampoo``, ``kl_soap``; see
:func:`with_refresh`)."""

REFRESHES: tuple[str, ...] = ("qr", "cholesky_qr64")
"""The values of the presets' ``refresh`` keyword: ``"qr"`` (default) keeps the preset's ``bases.QRPowerStep``
(Householder QR); ``"cholesky_qr64"`` replaces it by ``bases.CholeskyQR(every, precision="float64",
plain_passes=1)`` (:func:`with_refresh`)."""

_STRUCTURE_OPTIONS = ("large",)
"""Keywords every preset accepts for its structure: ``large`` (what a mode above ``max_dim`` gets: ``"none"``,
``"diagonal"``, or ``"block"``, Meta's blocking, for the ``NMode`` presets)."""


def optimizer_settings(lr: float, betas: Betas, weight_decay: float, defaults: dict[str, Any],
              options: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's keywords of a preset; ``options`` (the caller's) override the preset's ``defaults``."""
    chosen = {k: v for k, v in options.items()
              if k not in (*_PRECONDITIONER_OPTIONS, *_STRUCTURE_OPTIONS, *_ESTIMATOR_OPTIONS, *_BASIS_OPTIONS)}
    return dict(lr=lr, momentum=betas[0], weight_decay=weight_decay, **{**defaults, **chosen})


def with_options(options: dict[str, Any], preconditioner: Preconditioner) -> Preconditioner:
    """The preset's preconditioner with the caller's ``first_step``/``order``, structure ``large``, KL
    ``track_drift`` and QR ``basis_power`` and ``refresh``, if given."""
    structure = preconditioner.structure
    if "large" in options:
        compatibility.check(compatibility.structure_features(structure, options["large"]),
                            structure=type(structure).__name__)
        structure = attrs.evolve(structure, large=options["large"])
    estimator = preconditioner.estimator
    chosen = {k: options[k] for k in _ESTIMATOR_OPTIONS if k in options}
    if chosen:
        estimator = with_kl_fields(estimator, chosen)
    basis = preconditioner.basis
    if "basis_power" in options:
        basis = with_basis_power(basis, options["basis_power"])
    if "refresh" in options:  # after basis_power, which it then sees in the QR power step's power
        basis = with_refresh(basis, options["refresh"])
    return attrs.evolve(preconditioner, structure=structure, estimator=estimator, basis=basis,
                        **{k: options[k] for k in _PRECONDITIONER_OPTIONS if k in options})


def with_basis_power(basis: Any, power: int) -> Any:
    """``basis`` refreshing with ``qr(S^power Q)``: a ``QRPowerStep``; any other refresher is refused (the power
    is a number of orthogonal-iteration steps, which only the QR power step takes)."""
    if isinstance(basis, bases.QRPowerStep):
        return attrs.evolve(basis, power=power)
    raise ValueError(f"basis_power is the number of products of S in a QR power step (bases.QRPowerStep); this "
                     f"preset refreshes its basis with {type(basis).__name__}. Leave basis_power out, or use a preset "
                     "whose basis is the QR power step (kl_shampoo, soap, kl_soap)")


def with_refresh(basis: Any, refresh: str) -> Any:
    """``basis`` refreshing as ``refresh`` (one of :data:`REFRESHES`) names: ``"qr"`` keeps the ``QRPowerStep``
    as it is, ``"cholesky_qr64"`` replaces an unsorted one by ``bases.CholeskyQR(every=basis.every,
    precision="float64", plain_passes=1)``.

    Both are one step of orthogonal iteration, ``Q_k ← orth(Y)`` with ``orth(Y)`` the Q factor of ``Y = Q R`` with
    ``diag(R) > 0`` (unique, whatever algorithm computes it): ``Y = S_k Q_k`` for the QR power step, ``Y = (S_k +
    δI) Q_k`` for Cholesky-QR, ``δ = shift·tr(S_k)/d_k`` with ``shift = 1e-5`` (``bases.CholeskyQR``'s default),
    which does not change ``S_k``'s eigenvectors and keeps the columns of a rank-deficient ``S_k`` from vanishing.
    The QR power step factors ``Y`` by Householder QR. The float64 refresh forms ``Y`` in float64 and
    orthonormalises it with one shifted Cholesky-QR pass (``YᵀY + sI = L Lᵀ``, ``Y ← Y L⁻ᵀ``, ``s = 4·u₆₄·‖YᵀY‖_F``
    on unit columns; Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020, "Shifted Cholesky QR for computing the
    QR factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 42(1)), then one plain pass: matrix
    products, Cholesky factorisations and triangular solves only, batched over stacked factors, no Householder QR.
    In float64 the shifted pass brings every ``κ(Y)`` up to about 1e15 within the plain pass's reach, and one plain
    pass leaves ``‖QᵀQ − I‖ ≈ κ_in² u₆₄`` (``κ_in ≈ √(4u₆₄)·κ(Y)``), below float32's rounding of the stored basis up
    to ``κ(Y) ≈ 1e12``; the result is rounded to the basis dtype: Householder QR's basis to float32 round-off. Its
    first ``warmup`` (2) refreshes are QR power steps, while the basis is still far from ``S_k``'s eigenbasis; a
    batch entry whose factorisation fails keeps its old basis (``optimizer.stats()['cholesky_qr_kept_old_basis']``).
    ``every`` is the QR power step's (the one field both refreshers have), so ``stagger``, ``drift_tolerance`` and
    ``refresh_budget`` schedule the same refreshes.

    On an H100 the float64 refresh took the budgeted KL-Shampoo step from 16.3 ms (Householder QR) to 10.1 ms at
    a 25.6M GPT's shapes, and on GPT-2 small at T = 10 it kept ``kl_shampoo``'s final loss (paired Δ +0.0006
    [−0.0040, +0.0053], 2 seeds) at 94.3 against 109.9 ms per step (``docs/speed.md``, ``docs/benchmarks.md``).
    GPUs with fast float64 (H100, H200, A100) run its products and factorisations at full rate; on GPUs whose
    float64 runs at 1/32–1/64 of float32 (consumer cards) it is slow: keep ``"qr"`` there.

    Refused with the reason: an unknown ``refresh``; a ``basis`` that is no ``QRPowerStep`` (``eigh`` presets,
    Muon's identity: there is no QR refresh to choose); for ``"cholesky_qr64"``, a sorted QR power step (SOAP's:
    it orders the columns by their Rayleigh quotients at each refresh, and permutes ``V`` with them, which
    Cholesky-QR does not) and a power other than 1 (``basis_power``: the products of ``S`` in the QR power step's
    ``qr(S^p Q)``; Cholesky-QR takes one).
    """
    if refresh not in REFRESHES:
        raise ValueError(f"refresh must be 'qr' (the preset's QR power step, Householder QR) or 'cholesky_qr64' "
                         f"(bases.CholeskyQR in float64, two passes), got {refresh!r}")
    if not isinstance(basis, bases.QRPowerStep):
        raise ValueError(f"refresh={refresh!r} chooses how a QR power step (bases.QRPowerStep) refreshes the basis; "
                         f"this preset refreshes its basis with {type(basis).__name__}, which refresh does not "
                         "change. Leave refresh out, or use a preset whose basis is the unsorted QR power step "
                         "(kl_shampoo, kl_soap)")
    if refresh == "qr":
        return basis
    if basis.sort:
        raise ValueError("refresh='cholesky_qr64' needs an unsorted QR power step; this preset's (SOAP's) sorts the "
                         "basis's columns by their Rayleigh quotients diag(QᵀSQ) at each refresh and permutes its "
                         "state with them, which the Cholesky-QR refresh does not. Leave refresh out (or 'qr'), or "
                         "use kl_shampoo or kl_soap, whose QR power step does not sort")
    if basis.power != 1:
        raise ValueError(f"refresh='cholesky_qr64' with basis_power={basis.power}: the power is the number of "
                         "products of S in the QR power step's qr(S^p Q), and the Cholesky-QR refresh "
                         "orthonormalises (S + δI) Q, one product. Leave basis_power out (or 1), or keep "
                         "refresh='qr'")
    return bases.CholeskyQR(every=basis.every, precision="float64", plain_passes=1)


def with_kl_fields(estimator: Any, fields: dict[str, Any]) -> Any:
    """``estimator`` with the ``KL`` fields ``fields`` (``track_drift``, ``floor``): a ``KL``, or the ``KL``
    factors of a ``DenseSpectrum`` (KL-SOAP); any other estimator is refused (only KL's λ update forms the diagonal
    that makes the drift check free, and only KL keeps a floored λ)."""
    if isinstance(estimator, estimators.KL):
        return attrs.evolve(estimator, **fields)
    if isinstance(estimator, estimators.DenseSpectrum) and isinstance(estimator.factors, estimators.KL):
        return attrs.evolve(estimator, factors=attrs.evolve(estimator.factors, **fields))
    named = " and ".join(sorted(fields))
    raise ValueError(f"{named} needs a KL estimator (kl_shampoo, idealized_kl_shampoo, kl_soap); this preset's "
                     f"estimator is {type(estimator).__name__}, whose update does not form diag(QᵀΔQ) and keeps no "
                     f"floored λ. Leave {named} out (without track_drift, drift_tolerance measures the drift with "
                     "one S Q product per check)")
