"""``NewtonSchulz``: the direction replaced by its approximate polar factor ``U Vᵀ`` (Muon's orthogonalisation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import torch

from precond.layout import Layout
from precond.parts import ApplyContext
from precond.validators import is_number, number, one_of, plain_number

Triple = tuple[float, float, float]
Coefficients = Triple | tuple[Triple, ...] | Literal["polar_express"]

JORDAN: Triple = (3.4445, -4.7750, 2.0315)
"""Jordan's quintic (Jordan et al. 2024, the Muon post; ``torch.optim.Muon``'s default), used at every step."""

_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01

POLAR_EXPRESS: tuple[Triple, ...] = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW[:-1]) + _POLAR_EXPRESS_RAW[-1:]
"""Polar Express, degree 5 (Amsel, Persson, Musco & Gower 2025, arXiv:2505.16932, Algorithm 1): the optimal
polynomials for ``ℓ = 10⁻³, u = 1`` with the ``ℓ_t ≥ 0.0241·u_t`` cushion of their Appendix G, each ``p_t(x)``
replaced by ``p_t(x/1.01)`` (safety factor 1.01 of Section 4.4) except the last, ``(15x − 10x³ + 3x⁵)/8``, which
is kept exact and repeated for any further step; Appendix G's code with its defaults gives these polynomials
before the safety factor (``tests/test_muon.py`` re-derives them). Other tables in circulation differ (the first
five divided by a safety factor 1.05, or polynomials for other bounds); pass those as a sequence of triples."""

SCALES = ("none", "original", "match_rms_adamw")


def _as_triple(value: object) -> Triple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3 or not all(
            is_number(v) and math.isfinite(v) for v in value):
        raise ValueError("coefficients must be a triple (a, b, c) of finite numbers, a sequence of such triples "
                         f"(one per step) or 'polar_express'; got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _coefficients(value: object) -> Coefficients:
    """Converter: a name stays a name, one triple becomes a float triple, a table a tuple of float triples."""
    if isinstance(value, str):
        if value != "polar_express":
            raise ValueError(f"coefficients must be a triple (a, b, c), a sequence of triples or 'polar_express'; "
                             f"got the name {value!r}")
        return value  # type: ignore[return-value]
    if isinstance(value, Sequence) and len(value) > 0 and all(
            isinstance(v, Sequence) and not isinstance(v, str) for v in value):
        return tuple(_as_triple(v) for v in value)
    return _as_triple(value)


@attrs.frozen
class NewtonSchulz:
    """Replace the matrix direction ``M`` (``A × B``) by ``s(A, B) · X_T`` with ``X_T ≈ polar(M) = U Vᵀ``
    (``M = U Σ Vᵀ``), the step of Muon (Jordan et al. 2024; Bernstein & Newhouse 2024).

    With ``X`` the wide orientation of ``M`` (transposed when ``A > B``, so ``X Xᵀ`` is the smaller gram)::

        X_0 = X / max(m·‖X‖_F, eps)                                             (1)
        X_{t+1} = a_t X_t + (b_t A_t + c_t A_t²) X_t,   A_t = X_t X_tᵀ           (2)

    so ``X_T = U p(Σ/(m‖M‖_F)) Vᵀ`` with the composed odd polynomial ``p = p_T ∘ … ∘ p_1``,
    ``p_t(x) = a_t x + b_t x³ + c_t x⁵``; ``T = steps`` and (2) runs in ``dtype`` (bfloat16 as ``torch.optim.Muon``;
    float64 gives the polynomial to round-off). ``coefficients``:

    - a triple ``(a, b, c)`` used at every step; default Jordan's ``(3.4445, −4.7750, 2.0315)`` (``m = 1``,
      ``eps = 1e-7``: exactly ``torch.optim.Muon``'s normalisation ``X / ‖X‖.clamp(min=eps)``);
    - a sequence of triples, one per step, the last repeated when ``steps`` is longer;
    - ``"polar_express"``: :data:`POLAR_EXPRESS` (Amsel et al. 2025, Algorithm 1: eight quintics for ``ℓ = 10⁻³``,
      safety factor 1.01 on all but the last) with ``m = 1.01`` as in their normalisation
      ``X / (1.01‖X‖_F + 10⁻⁷)``; (1) takes the ``max`` of the two instead of their sum, a relative difference of
      ``10⁻⁷/‖X‖_F``, below bfloat16 resolution unless ``‖X‖_F ≲ 10⁻⁵``.

    ``scale`` multiplies the result by a factor of the viewed shape ``A × B`` (``A`` = out, the first dimension;
    ``B`` = the product of the others), the learning-rate adjustment of ``torch.optim.Muon`` (its ``adjust_lr_fn``):

    - ``"none"``: 1 (the polar factor itself);
    - ``"original"``: ``√max(1, A/B)`` (Jordan's Muon; torch's ``"original"`` and its default ``None``);
    - ``"match_rms_adamw"``: ``0.2·√max(A, B)`` (Moonlight, Liu et al. 2025: the update's RMS ≈ 0.2, AdamW's).

    Libraries that store weights ``(in, out)`` (JAX/optax) swap ``A`` and ``B`` in these names. The factor sits here,
    not in the learning rate, so decoupled weight decay keeps the unadjusted ``η`` as torch does.
    The layout must be a matrix view (``structures.Matrix``); no state is kept.
    """

    steps: int = attrs.field(default=5, converter=plain_number, validator=number(
        low=1, integer=True, meaning="the number of Newton–Schulz iterations T"))
    coefficients: Coefficients = attrs.field(default=JORDAN, converter=_coefficients)
    dtype: torch.dtype = attrs.field(default=torch.bfloat16, validator=one_of(
        (torch.bfloat16, torch.float16, torch.float32, torch.float64)))
    eps: float = attrs.field(default=1e-7, converter=plain_number, validator=number(
        low=0, low_open=True, meaning="floor of the normalising Frobenius norm in (1)"))
    scale: Literal["none", "original", "match_rms_adamw"] = attrs.field(
        default="none", validator=one_of(SCALES))

    @property
    def margin(self) -> float:
        """``m`` of (1): 1.01 for ``"polar_express"`` (its Algorithm 1), 1 otherwise."""
        return POLAR_EXPRESS_SAFETY if self.coefficients == "polar_express" else 1.0

    def schedule(self) -> list[Triple]:
        """The ``(a_t, b_t, c_t)`` of each of the ``steps`` iterations."""
        if self.coefficients == "polar_express":
            table: Sequence[Triple] = POLAR_EXPRESS
        elif isinstance(self.coefficients[0], tuple):
            table = self.coefficients  # type: ignore[assignment]
        else:
            table = (self.coefficients,)  # type: ignore[assignment]
        return [table[min(t, len(table) - 1)] for t in range(self.steps)]

    def factor(self, rows: int, cols: int) -> float:
        """``s(A, B)`` of ``scale`` for an ``A × B`` view."""
        if self.scale == "original":
            return math.sqrt(max(1.0, rows / cols))
        if self.scale == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return 1.0

    def exponent(self, layout: Layout) -> float:
        """½: ``polar(M) = (M Mᵀ)^{-1/2} M``, the one-sided gram's inverse square root."""
        return 0.5

    def init_state(self, grad: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, direction: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        """A ``(batch, A, B)`` direction → ``s · X_T`` (same shape and dtype), by (1)–(2) on each batch entry."""
        layout = ctx.layout
        if layout.order != 2:
            raise ValueError(
                f"NewtonSchulz needs a matrix view of the weight, got the view {layout.view_shape} of shape "
                f"{layout.shape}: use structures.Matrix() (which views (out, -1)) and send vectors to another group")
        rows, cols = layout.view_shape
        x = direction.to(self.dtype)
        tall = rows > cols
        if tall:
            x = x.mT
        norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True)
        x = x / (norm * self.margin if self.margin != 1.0 else norm).clamp(min=self.eps)
        for a, b, c in self.schedule():
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        if tall:
            x = x.mT
        out = x.to(direction.dtype)
        factor = self.factor(rows, cols)
        return out * factor if factor != 1.0 else out
