"""The exponential moving average every statistic of the library uses (factors, spectra, ``V``, a graft's ``v``).

``old ← β old + (1−β) new`` per batch entry, skipped for an entry whose gradient is all zero (a zero
gradient must not decay the statistics; ``docs/design.md``, "Step order").
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence, Union

import torch

from precond.reductions import max_abs

_last = threading.local()
"""The last gradient :func:`nonzero_gradient` read (a weak reference and its version counter) and its mask, per
thread: the estimator, a dense spectrum and a graft all ask for the same gradient within one step."""


def nonzero_gradient(grad: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the gradient of each batch entry has a nonzero entry (no host sync; a NaN entry counts as not
    nonzero, as ``NaN > 0`` is false).

    ``max |g| > 0`` (:func:`precond.reductions.max_abs`, one reduction on CUDA). The mask of the most recent
    gradient is kept (per thread) and returned again while that same tensor is alive and unchanged (its version
    counter), so the parts of one step that each fold this gradient share one reduction. Do not modify it."""
    ref, version, mask = getattr(_last, "entry", (None, -1, None))
    if ref is not None and ref() is grad and not grad.is_inference() and version == grad._version:
        return mask
    dims = tuple(range(1, grad.ndim))
    mask = (max_abs(grad, dims) if dims else grad.abs()) > 0
    if not grad.is_inference():
        _last.entry = (weakref.ref(grad), grad._version, mask)
    return mask


def fold_weights(beta: float, active: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B,)`` weights of the new term for :func:`fold`: ``1−β`` (or 1 for a sum) where ``active``, else 0.

    Computed once per update and shared by every fold of it (one ``where`` in the default dtype, where the constant
    rounds to the same number as ``active.to(dtype) * (1−β)``; that product in any other dtype)."""
    weight = 1.0 if beta == 1.0 else 1.0 - beta
    if dtype == torch.get_default_dtype():
        return torch.where(active, weight, 0.0)
    return active.to(dtype) * weight


def gradient_weights(beta: float, grad: torch.Tensor) -> torch.Tensor:
    """:func:`fold_weights` for the entries of ``grad`` (``(B, …)``) that are not all zero.

    The weights of the most recent mask (per thread) are returned again for the same kept mask of
    :func:`nonzero_gradient`, ``β`` and dtype: statistics of one gradient with one ``β`` (SOAP's factors and ``V``)
    share one ``where``. Do not modify them."""
    mask = nonzero_gradient(grad)
    ref, key, weights = getattr(_last, "weights", (None, None, None))
    if ref is not None and ref() is mask and key == (beta, grad.dtype):
        return weights
    weights = fold_weights(beta, mask, grad.dtype)
    _last.weights = (weakref.ref(mask), (beta, grad.dtype), weights)
    return weights


def fold(old: torch.Tensor, new: torch.Tensor, beta: float, weights: torch.Tensor) -> None:
    """In place: ``old ← β old + (1−β) new`` per batch entry, with ``weights`` from :func:`fold_weights`.

    ``β = 1`` accumulates the plain sum ``old ← old + new`` (original Shampoo/AdaGrad).
    """
    weight = weights.view(weights.shape[0], *([1] * (old.ndim - 1)))
    if beta == 1.0:
        old.addcmul_(new, weight)
    else:
        old.lerp_(new, weight)


def fold_all(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], beta: float, weights: torch.Tensor) -> None:
    """:func:`fold` of every ``(old, new)`` pair with the same ``β`` and ``weights``, as one ``torch._foreach_lerp_``
    (``_foreach_addcmul_`` for ``β = 1``) instead of one op per pair, and one view of ``weights`` per tensor order.

    The same numbers as folding each pair: a foreach op whose weights do not have their tensor's shape runs the
    single-tensor op on each pair (a weight of one shape with its tensor is the same elementwise formula)."""
    if not pairs:
        return
    views: dict[int, torch.Tensor] = {}
    olds, news, shaped = [], [], []
    for old, new in pairs:
        if old.ndim not in views:
            views[old.ndim] = weights.view(weights.shape[0], *([1] * (old.ndim - 1)))
        olds.append(old)
        news.append(new)
        shaped.append(views[old.ndim])
    if beta == 1.0:
        torch._foreach_addcmul_(olds, news, shaped)
    else:
        torch._foreach_lerp_(olds, news, shaped)


Step = Union[int, torch.Tensor]
"""A step count ``t``: a Python int, or a 0-d device tensor inside a captured (CUDA-graph) step."""


def bias_correction(beta: float, step: Step) -> Union[float, torch.Tensor]:
    """``1 − β^max(t, 1)``, the divisor that un-biases an EMA started at zero (Adam's ``m̂``, ``v̂``).

    For a tensor ``t`` (a captured step, whose count changes between replays) it is computed on the device in ``t``'s
    dtype (float64), so it agrees with the Python-float value to float64 round-off."""
    if isinstance(step, torch.Tensor):
        return 1.0 - torch.pow(beta, step.clamp_min(1))
    return 1.0 - beta ** max(step, 1)


def momentum_direction(momentum: torch.Tensor, x: torch.Tensor, beta: float, nesterov: bool, corrected: bool,
                       step: Step) -> torch.Tensor:
    """Fold ``x`` into the momentum, ``m ← β m + (1−β) x`` (in place), and return the direction it gives: ``m``, or
    Nesterov's ``(1−β) x + β m``; divided by :func:`bias_correction` ``1 − βᵗ`` when ``corrected`` (Adam's ``m̂``).

    ``x`` is the gradient in the parameter's coordinates (``precond.Optimizer``'s momentum), or its rotation
    ``G ×_k Q_k`` into the bases where the momentum is kept there (``Preconditioner(momentum_in_basis=True)``): the
    same linear rule in either coordinates."""
    momentum.lerp_(x, 1.0 - beta)
    source = x.lerp(momentum, beta) if nesterov else momentum
    if corrected:
        source = source / bias_correction(beta, step)
    return source
