"""Mode products, rotations and mode-k grams for tensors of any order, through cached einsum paths.

Every tensor here carries a **leading batch axis** ``b``: ``X`` has shape ``(B, d_1, ..., d_N)`` and a
factor for mode ``k`` has shape ``(B, d_k, d_k)``. Parameters of equal layout can therefore be stacked
and processed with one contraction instead of one per tensor; a single parameter is a batch of one.

Notation (``docs/design.md``, "Notation"): ``X ×_k A`` contracts mode ``k`` of ``X`` with the first index of ``A``;
rotation into the bases ``R = X ×_1 Q_1 ⋯ ×_N Q_N`` (``= Q_1ᵀ X Q_2`` for matrices), back
``U = R ×_1 Q_1ᵀ ⋯ ×_N Q_Nᵀ``; ``Gram_k(X) = X_(k) X_(k)ᵀ``. A mode whose basis is ``None`` is an
identity mode: it is carried through untouched.

Expressions are built once per (shapes, identity pattern) with ``opt_einsum.contract_expression`` and
cached, so the path search is paid once per layout.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import opt_einsum
import torch

__all__ = ["rotate", "unrotate", "gram", "grams", "scale", "outer", "mode_product"]

_BATCH = "Z"


def _letters(n: int, offset: int = 0) -> list[str]:
    # a-y are mode letters (25 is more than any weight order we meet), Z is the batch axis.
    if n + offset > 25:
        raise ValueError(f"tensor order {n} is too large for the contraction module (at most 25 modes)")
    return [chr(ord("a") + offset + i) for i in range(n)]


@functools.lru_cache(maxsize=4096)
def _rotation_expression(shape: tuple[int, ...], dense: tuple[bool, ...], inverse: bool):
    """``einsum`` for ``X ×_k Q_k`` over the dense modes (``inverse`` uses ``Q_kᵀ``)."""
    order = len(shape) - 1
    src = _letters(order)
    dst = [chr(ord("A") + i) if d else s for i, (s, d) in enumerate(zip(src, dense))]
    operands = [_BATCH + "".join(src)]
    shapes = [shape]
    for k, is_dense in enumerate(dense):
        if not is_dense:
            continue
        d_k = shape[k + 1]
        # forward: R[.., a, ..] = sum_i X[.., i, ..] Q[i, a]; inverse: U[.., i, ..] = sum_a Y[.., a, ..] Q[i, a]
        operands.append(_BATCH + (src[k] + dst[k] if not inverse else dst[k] + src[k]))
        shapes.append((shape[0], d_k, d_k))
    equation = ",".join(operands) + "->" + _BATCH + "".join(dst)
    return opt_einsum.contract_expression(equation, *shapes)


def rotate(x: torch.Tensor, bases: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Rotate into the eigenbases: ``R = X ×_1 Q_1 ⋯ ×_N Q_N``, i.e. ``Q_kᵀ`` applied along each mode.

    ``x`` has shape ``(B, d_1, …, d_N)``; ``bases[k]`` is ``(B, d_k, d_k)`` or ``None`` (identity mode).
    """
    return _apply(x, bases, inverse=False)


def unrotate(y: torch.Tensor, bases: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Rotate back from the eigenbases: ``U = Y ×_1 Q_1ᵀ ⋯ ×_N Q_Nᵀ`` (inverse of :func:`rotate`)."""
    return _apply(y, bases, inverse=True)


def _apply(x: torch.Tensor, bases: Sequence[Optional[torch.Tensor]], inverse: bool) -> torch.Tensor:
    if len(bases) != x.ndim - 1:
        raise ValueError(f"got {len(bases)} bases for a tensor of order {x.ndim - 1} (plus batch axis)")
    dense = tuple(q is not None for q in bases)
    if not any(dense):
        return x
    expr = _rotation_expression(tuple(x.shape), dense, inverse)
    return expr(x, *[q for q in bases if q is not None], backend="torch")


def mode_product(x: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """``X ×_k A`` for one mode ``k`` (0-based, not counting the batch axis): contract ``A``'s first index."""
    bases: list[Optional[torch.Tensor]] = [None] * (x.ndim - 1)
    bases[k] = a
    return rotate(x, bases)


@functools.lru_cache(maxsize=4096)
def _gram_expression(shape: tuple[int, ...], k: int):
    order = len(shape) - 1
    left = _letters(order)
    right = list(left)
    right[k] = "A"
    equation = f"{_BATCH}{''.join(left)},{_BATCH}{''.join(right)}->{_BATCH}{left[k]}A"
    return opt_einsum.contract_expression(equation, shape, shape)


def gram(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-k gram ``Gram_k(X) = X_(k) X_(k)ᵀ`` of shape ``(B, d_k, d_k)``."""
    return _gram_expression(tuple(x.shape), k)(x, x, backend="torch")


def grams(x: torch.Tensor, modes: Sequence[int]) -> dict[int, torch.Tensor]:
    """``Gram_k(X)`` for every ``k`` in ``modes``."""
    return {k: gram(x, k) for k in modes}


def _broadcast_view(v: torch.Tensor, order: int, k: int) -> torch.Tensor:
    shape = [v.shape[0]] + [1] * order
    shape[k + 1] = v.shape[1]
    return v.view(shape)


def outer(vectors: Sequence[Optional[torch.Tensor]], shape: Sequence[int]) -> torch.Tensor:
    """Rank-one tensor ``⊗_k v_k`` of shape ``(B, d_1, …, d_N)``; a ``None`` entry is a vector of ones."""
    order = len(shape) - 1
    result = None
    for k, v in enumerate(vectors):
        if v is None:
            continue
        view = _broadcast_view(v, order, k)
        result = view if result is None else result * view
    if result is None:
        raise ValueError("outer() needs at least one vector")
    return result.expand(*shape)


def scale(x: torch.Tensor, vectors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``X ⊙ ⊗_k v_k`` (broadcast, no full-size outer product is materialised); ``None`` entries are ones."""
    order = x.ndim - 1
    for k, v in enumerate(vectors):
        if v is not None:
            x = x * _broadcast_view(v, order, k)
    return x
