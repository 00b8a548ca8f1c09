"""The keys of a variant description and how each value is read (from a command-line string or a TOML value).

Every reader takes the raw value and returns the canonical one, or raises ``ValueError`` saying what was
expected; the variant parser adds which key was wrong.
"""

from __future__ import annotations

import fractions
from typing import Any, Callable, Optional, Union

import precond
from precond import precision
from precond.ablate import catalog, peers
from precond.preset_options import REFRESHES

STRUCTURES = catalog.names("structure")
ESTIMATORS = catalog.names("estimator")
BASES = catalog.names("basis")
GRAFTS = catalog.names("graft")
LARGE_MODES = catalog.LARGE_MODES
EPS_PLACEMENTS = ("factor", "outside")
DECAY_ORDERS = ("before", "after")
NAMED = tuple(dict.fromkeys((*precond.PRESETS, *peers.PEERS)))
"""Variants given by name alone: the library's presets, ``torch.optim.AdamW`` and the peers of
:mod:`precond.ablate.peers` (HeavyBall, pytorch-optimizer, ``torch.optim.Muon``)."""

APPLIER_FORMS = "power (= power:0.5), power:0.5, power:0.25, power:1/(2N), or power:<p> with p in [0, 1]"

Exponent = Union[float, str]


def choice(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    """A reader accepting one of ``allowed`` (case-insensitive, ``-`` read as ``_``)."""
    def read(value: Any) -> str:
        text = str(value).strip().lower().replace("-", "_")
        if text not in allowed:
            raise ValueError(f"got {value!r}; allowed: {', '.join(allowed)}")
        return text
    return read


def number(value: Any) -> float:
    """A finite float from a number or a string such as ``3e-4`` or ``1/4``."""
    if isinstance(value, bool):
        raise ValueError(f"got {value!r}; expected a number")
    try:
        result = float(fractions.Fraction(value.strip())) if isinstance(value, str) and "/" in value else float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"got {value!r}; expected a number such as 0.9, 3e-4 or 1/4") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError(f"got {value!r}; expected a finite number")
    return result


def unit_interval(value: Any) -> float:
    """A number in ``[0, 1)`` (an EMA weight)."""
    result = number(value)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"got {value!r}; expected a number in [0, 1)")
    return result


def tolerance(value: Any) -> float:
    """A number in ``[0, 1]`` (``drift_tolerance``: a relative norm)."""
    result = number(value)
    if not 0.0 <= result <= 1.0:
        raise ValueError(f"got {value!r}; expected a number in [0, 1]")
    return result


def positive(value: Any) -> float:
    result = number(value)
    if result <= 0:
        raise ValueError(f"got {value!r}; expected a number > 0")
    return result


def nonnegative(value: Any) -> float:
    result = number(value)
    if result < 0:
        raise ValueError(f"got {value!r}; expected a number ≥ 0")
    return result


def positive_int(value: Any) -> int:
    result = number(value)
    if not result.is_integer() or result < 1:
        raise ValueError(f"got {value!r}; expected a positive integer")
    return int(result)


def max_dim(value: Any) -> Optional[int]:
    """A positive integer, or ``none`` for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return positive_int(value)
    except ValueError:
        raise ValueError(f"got {value!r}; expected a positive integer or none (no limit)") from None


def rms_or_none(value: Any) -> Optional[float]:
    """The RMS ``Normalize`` rescales the update to (a number > 0), or ``none`` for no normalisation."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    result = number(value)
    if result <= 0:
        raise ValueError(f"got {value!r}; expected the update's RMS (a number > 0, e.g. 0.2) or none")
    return result


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"got {value!r}; expected true or false")


def applier(value: Any) -> Exponent:
    """``power`` / ``power:<p>`` → the exponent ``p`` (a float in [0, 1] or the string ``"1/(2N)"``)."""
    text = str(value).strip().lower().replace(" ", "")
    kind, _, exponent = text.partition(":")
    if kind != "power":
        raise ValueError(f"got {value!r}; allowed: {APPLIER_FORMS}")
    if not exponent:
        return 0.5
    if exponent in ("1/(2n)", "1/2n"):
        return "1/(2N)"
    try:
        p = number(exponent)
    except ValueError:
        raise ValueError(f"got {value!r}; allowed: {APPLIER_FORMS}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"got {value!r}: p must lie in [0, 1]; allowed: {APPLIER_FORMS}")
    return p


def format_applier(p: Exponent) -> str:
    return f"power:{p}" if isinstance(p, str) else f"power:{p:g}"


def learning_rates(value: Any) -> tuple[float, ...]:
    """One or more positive learning rates: a list, a number, or a string ``1e-3/3e-3`` (``/``-separated)."""
    items = value if isinstance(value, (list, tuple)) else str(value).split("/") if isinstance(value, str) else [value]
    if not items:
        raise ValueError("got an empty list; expected one or more learning rates")
    rates = tuple(number(item) for item in items)
    if any(rate <= 0 for rate in rates):
        raise ValueError(f"got {value!r}; learning rates must be > 0")
    return rates


ROTATION_DTYPES = tuple(str(dtype).removeprefix("torch.") for dtype in precision.ROTATION_DTYPES)
"""The names of :data:`precond.precision.ROTATION_DTYPES`: ``bfloat16``, ``float16``."""


def rotation_dtype(value: Any) -> str:
    """``bfloat16`` or ``float16`` (``bf16``, ``fp16`` accepted): the operand dtype of the applier's rotations."""
    text = str(value).strip().lower()
    text = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(text, text)
    if text not in ROTATION_DTYPES:
        raise ValueError(f"got {value!r}; allowed: bfloat16 (bf16), float16 (fp16); leave the key out for rotations "
                         "in the state dtype")
    return text


INIT_LAMBDA_FROM_DATA = "data"
"""``init_lambda = "data"``: λ₀ is the spectrum of the first filled factor (``estimators.KL(init_lambda=None)``)."""


def init_lambda(value: Any) -> Union[float, str]:
    """KL's λ at step 0: a number > 0 (the authors' prototype: 0.1), or ``data`` for the first factor's spectrum."""
    if isinstance(value, str) and value.strip().lower() in (INIT_LAMBDA_FROM_DATA, "none"):
        return INIT_LAMBDA_FROM_DATA
    try:
        return positive(value)
    except ValueError:
        raise ValueError(f"got {value!r}; expected a number > 0 (e.g. 0.1) or data (λ₀ from the first factor's "
                         "spectrum)") from None


FLOORS = ("dimension", "product")
"""KL's named floors on λ (``estimators.KL``'s ``floor``); a number ≥ 0 is an absolute floor."""


def floor(value: Any) -> Union[float, str]:
    """KL's floor on λ: ``dimension`` (the prototype's clamp), ``product`` (the same bound on the product of every
    mode's λ) or a number ≥ 0."""
    if isinstance(value, str) and value.strip().lower() in FLOORS:
        return value.strip().lower()
    try:
        return nonnegative(value)
    except ValueError:
        raise ValueError(f"got {value!r}; expected dimension (the prototype's clamp λ ≥ max(10, min(d, 4000))^-2), "
                         "product (the same bound on the product of every mode's λ, for weights with a mode "
                         "without a factor) or a number ≥ 0") from None


def name(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("got an empty name")
    return text


EMBEDDINGS = ("adam", "one_sided")
"""What ``embeddings`` may give the embeddings and the output head (left out: the variant's own preconditioning)."""

POLAR_DTYPES = ("bfloat16", "float32")
"""What ``polar_dtype`` may be: the dtype of ``polar``'s Newton–Schulz iteration (bfloat16, Muon's, by default)."""

POLAR_SCALES = ("none", "original", "match_rms_adamw")
"""What ``polar`` may be: ``none`` (no orthogonalisation, the default) or the scale of the polar factor
(``precond.NewtonSchulz.scale``: Jordan's ``√max(1, A/B)``, or Moonlight's ``0.2·√max(A, B)``, AdamW's RMS)."""

CHOICES: dict[str, tuple[str, ...]] = {
    "structure": STRUCTURES, "large": LARGE_MODES, "estimator": ESTIMATORS, "basis": BASES, "graft": GRAFTS,
    "eps_placement": EPS_PLACEMENTS, "decay_order": DECAY_ORDERS, "embeddings": EMBEDDINGS,
    "polar": POLAR_SCALES, "polar_dtype": POLAR_DTYPES, "ns_dtype": POLAR_DTYPES, "refresh": REFRESHES,
}
"""The keys whose value is one of a few names, and those names."""

READERS: dict[str, Callable[[Any], Any]] = {
    "structure": choice(CHOICES["structure"]),
    "max_dim": max_dim,
    "large": choice(CHOICES["large"]),
    "estimator": choice(CHOICES["estimator"]),
    "basis": choice(CHOICES["basis"]),
    "every": positive_int,
    "basis_power": positive_int,
    "sweeps": positive_int,
    "plain_passes": positive_int,
    "refresh": choice(CHOICES["refresh"]),
    "fold_every": positive_int,
    "momentum_in_basis": boolean,
    "applier": applier,
    "normalize": rms_or_none,
    "polar": choice(CHOICES["polar"]),
    "polar_dtype": choice(CHOICES["polar_dtype"]),
    "graft": choice(CHOICES["graft"]),
    "beta1": unit_interval,
    "beta2": unit_interval,
    "eps": nonnegative,
    "weight_decay": nonnegative,
    "eps_placement": choice(CHOICES["eps_placement"]),
    "bias_correction": boolean,
    "decay_order": choice(CHOICES["decay_order"]),
    "adam_lr": positive,
    "ns_dtype": choice(CHOICES["ns_dtype"]),
    "rotation_dtype": rotation_dtype,
    "init_lambda": init_lambda,
    "floor": floor,
    "track_drift": boolean,
    "embeddings": choice(CHOICES["embeddings"]),
    **{key: boolean for key in ("stagger", "async_refresh", "capture", "tf32")},
    "drift_tolerance": tolerance,
    "refresh_budget": positive_int,
}
"""Keys that describe the optimizer (the identity of a variant), in canonical order. The part names allowed for
``structure``, ``estimator``, ``basis`` and ``graft`` come from :data:`precond.ablate.catalog.PARTS`."""

SPEED_KEYS = ("stagger", "async_refresh", "capture", "tf32", "drift_tolerance", "refresh_budget")
"""Keys that choose how :class:`precond.Optimizer` runs a step (its keywords of the same names), not the parts.
They are part of a variant's identity: step times differ, and ``stagger``, ``tf32``, ``drift_tolerance`` and
``refresh_budget`` change the updates."""

EXPECTATIONS = ("diverge",)
"""What ``expect`` may announce: ``diverge`` (the variant is there to show a failure, e.g. Shampoo without grafting)."""

LABEL_KEYS = {"name": name, "lr": learning_rates, "preset": choice(NAMED), "lr_from": name, "adam_lr_from": name,
              "bracket": boolean, "why": name, "expect": choice(EXPECTATIONS)}
"""Keys that name a variant, choose its learning rates (``lr``; ``lr_from``: the best lr of another variant, once
that one is tuned; ``adam_lr_from``: a Muon's ``adam_lr`` set to another variant's best lr; ``bracket``: whether
the workbench extends the grid until the best lr lies inside it), say why it is in the ablation (``why``, printed
in the summary), announce that it is expected to diverge (``expect = "diverge"``: its grid is not extended and
the summary does not ask for wider lrs) or its preset (not part of a composition)."""

ALIASES = {"lrs": "lr", "wd": "weight_decay", "reason": "why"}
"""Alternative spellings of keys."""


MEANINGS: dict[str, str] = {
    "max_dim": "the largest mode that gets a dense factor: a positive integer, or none (no limit)",
    "large": "what a mode above max_dim gets",
    "every": "the refresh period T of the basis (a positive integer)",
    "basis_power": "the qr refresh computes qr(S^p Q), p steps of orthogonal iteration for one QR (basis qr, or a "
                   "preset whose basis is the QR power step: kl_shampoo, kl_soap, soap; bases.QRPowerStep's power; "
                   "default 1)",
    "sweeps": "refinement sweeps per refresh of basis refine (bases.Refine's sweeps; default 2)",
    "plain_passes": "plain Cholesky-QR passes after the shifted one of basis cholesky_qr64 (bases.CholeskyQR's "
                    "plain_passes: 1 or 2, default 2; one serves a float32 basis up to κ(SQ) ≈ 1e12)",
    "refresh": "how a preset's unsorted QR power step refreshes its basis (kl_shampoo, kl_soap; precond.kl_shampoo's "
               "refresh; presets only, a composition writes basis=cholesky_qr64,plain_passes=1): qr (default, "
               "Householder QR) or cholesky_qr64 (the same basis from the two-pass float64 Cholesky-QR, "
               "bases.CholeskyQR(precision='float64', plain_passes=1); slow on GPUs without fast float64)",
    "fold_every": "the estimator folds a gradient every this many steps (precond.Preconditioner's fold_every; "
                  "default 1: every step)",
    "momentum_in_basis": "the momentum is kept rotated into the eigenbases (precond.Preconditioner's "
                         "momentum_in_basis: the same updates up to round-off, one rotation fewer per folding step; "
                         "appliers power only; true/false, default false)",
    "normalize": "rescale the update to this RMS (Normalize; ASGO uses 0.2), or none",
    "polar": "replace the applier's direction on matrices by its polar factor scaled as named (precond.Polar: "
             "Muon's five bfloat16 Newton–Schulz steps after the preconditioner; original √max(1, A/B) as Jordan's "
             "Muon, match_rms_adamw 0.2·√max(A, B), AdamW's RMS, so one lr suits the vectors' inner step too; "
             "default none)",
    "polar_dtype": "the dtype of polar's Newton–Schulz iteration: bfloat16 (default, Muon's) or float32 (CPUs "
                   "without bfloat16 matrix units run it many times faster)",
    "beta1": "momentum β₁ in [0, 1)",
    "beta2": "the estimator's EMA weight β₂ in [0, 1)",
    "eps": "the applier's ε ≥ 0",
    "weight_decay": "decoupled weight decay ≥ 0 (default: the run's setting)",
    "eps_placement": "(λ+ε)^-p (factor) or 1/(λ^p+ε) (outside)",
    "bias_correction": "bias-corrected momentum: true or false",
    "decay_order": "weight decay before or after the update",
    "rotation_dtype": "operand dtype of the rotations into and out of the eigenbasis (precond.Optimizer's "
                      "rotation_dtype; default: the state dtype)",
    "init_lambda": "KL's λ at step 0 (estimator kl or kl_soap): a number > 0 (default 0.1, the authors' prototype) "
                   "or data (the spectrum of the first filled factor)",
    "floor": "KL's lower bound on λ (estimator kl or kl_soap, or a preset with a KL estimator): dimension (default, "
             "the authors' prototype: λ_k ≥ max(10, min(d_k, 4000))^-2), product (the same bound on the product of "
             "every mode's λ: one-sided structures and modes above max_dim without a factor) or a number ≥ 0",
    "track_drift": "KL keeps diag(QᵀSQ) current (estimator kl or kl_soap, or a preset with a KL estimator: true/"
                   "false), so that drift_tolerance checks a basis without a d³ product (default false)",
    "embeddings": "what the embeddings and the output head get (the matrices a Muon gives to Adam): AdamW "
                  "(betas 0.9/0.95, eps 1e-8, the variant's lr and weight decay) or the variant's parts on the "
                  "smaller side only (structures.OneSided); default: the variant's own preconditioning",
    "stagger": "spread the basis refreshes over the T steps (precond.Optimizer's stagger; the same math per factor, "
               "at its own phase)",
    "async_refresh": "run the refreshes on side CUDA streams, installed at the next step (the same updates)",
    "capture": "replay each bucket's steady step as a CUDA graph (the same updates; CUDA only, eager elsewhere)",
    "tf32": "TF32 matrix products in the step and the refreshes (true/false; default: torch's global setting)",
    "drift_tolerance": "refresh a due basis only when the relative off-diagonal norm of QᵀSQ is at least this (a "
                       "number in [0, 1]; precond.Optimizer's drift_tolerance; default: every due refresh)",
    "refresh_budget": "with drift_tolerance: each step refreshes at most the work Σd³/B of a fixed schedule of "
                      "period B (a positive integer), the most drifted bases first (precond.Optimizer's "
                      "refresh_budget; default: no cap)",
    "ns_dtype": "the dtype of muon's Newton–Schulz iteration: bfloat16 (default, Jordan's) or float32 (CPUs "
                "without fast bfloat16 products; precond.muon's ns_dtype); muon only",
    "adam_lr": "the Adam part's learning rate: of muon and torch_muon (embeddings, head, vectors; default 3e-4), "
               "or of the AdamW that embeddings=adam gives the embeddings and the head (default: the variant's lr)",
}
"""What a key means, for ``--list``."""


def describe(key: str) -> str:
    """What ``key`` means and accepts, for ``--list``."""
    allowed = ", ".join(CHOICES[key]) if key in CHOICES else APPLIER_FORMS if key == "applier" else ""
    return "; ".join(text for text in (MEANINGS.get(key, ""), allowed) if text)
