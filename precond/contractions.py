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

Low-precision rotations (``operand_dtype``, ``precond.Optimizer(rotation_dtype=...)``): the mode products run one
mode after another (dense modes in order), each with both operands rounded to ``operand_dtype`` (bfloat16 or
float16) and accumulated and written in ``x``'s dtype: ``Y ← fl(Y) ×_k fl(Q_k)``, where ``fl`` rounds to
``operand_dtype``. On CUDA that is one ``torch.bmm(..., out_dtype=float32)`` per mode (tensor cores, float32
accumulation); elsewhere the rounded operands are multiplied in ``x``'s dtype, which is the same arithmetic (a
product of two bfloat16 or float16 numbers is exact in float32).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import opt_einsum
import torch

__all__ = ["rotate", "unrotate", "gram", "grams", "scale", "outer", "broadcast_outer", "broadcast_view", "each",
           "mode_product"]

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
    dst = [chr(ord("A") + i) if d else s for i, (s, d) in enumerate(zip(src, dense, strict=True))]
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


def rotate(x: torch.Tensor, bases: Sequence[Optional[torch.Tensor]],
           operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rotate into the eigenbases: ``R = X ×_1 Q_1 ⋯ ×_N Q_N``, i.e. ``Q_kᵀ`` applied along each mode.

    ``x`` has shape ``(B, d_1, …, d_N)``; ``bases[k]`` is ``(B, d_k, d_k)`` or ``None`` (identity mode).
    ``operand_dtype`` (bfloat16 or float16): low-precision operands, ``x``'s dtype for accumulation and result
    (module docstring); ``None`` (default): one einsum in ``x``'s dtype.
    """
    return _apply(x, bases, inverse=False, operand_dtype=operand_dtype)


def unrotate(y: torch.Tensor, bases: Sequence[Optional[torch.Tensor]],
             operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rotate back from the eigenbases: ``U = Y ×_1 Q_1ᵀ ⋯ ×_N Q_Nᵀ`` (inverse of :func:`rotate`); ``operand_dtype``
    as there."""
    return _apply(y, bases, inverse=True, operand_dtype=operand_dtype)


def _apply(x: torch.Tensor, bases: Sequence[Optional[torch.Tensor]], inverse: bool,
           operand_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if len(bases) != x.ndim - 1:
        raise ValueError(f"got {len(bases)} bases for a tensor of order {x.ndim - 1} (plus batch axis)")
    dense = tuple(q is not None for q in bases)
    if not any(dense):
        return x
    if operand_dtype is not None:
        return _apply_low(x, bases, inverse, operand_dtype)
    expr = _rotation_expression(tuple(x.shape), dense, inverse)
    return expr(x, *[q for q in bases if q is not None], backend="torch")


def mode_product(x: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """``X ×_k A`` for one mode ``k`` (0-based, not counting the batch axis): contract ``A``'s first index."""
    bases: list[Optional[torch.Tensor]] = [None] * (x.ndim - 1)
    bases[k] = a
    return rotate(x, bases)


def change_basis(x: torch.Tensor, old: torch.Tensor, new: torch.Tensor, k: int) -> torch.Tensor:
    """``X`` rotated along mode ``k`` by ``old`` (``X = Y ×_k Q_old``) re-expressed in ``new``: ``Y ×_k Q_new``,
    i.e. ``X ×_k (Q_oldᵀ Q_new)`` (``Q_old`` orthogonal). Of the two orders of the products the cheaper is taken:
    ``C = Q_oldᵀ Q_new`` then ``X ×_k C`` (``2d³ + 2d²n`` flops, ``n`` the size of the other modes), or ``X`` rotated
    back by ``Q_old`` and into ``Q_new`` (``4d²n``), which wins where ``n < d``."""
    d = x.shape[k + 1]
    others = x[0].numel() // max(d, 1)
    if others < d:
        return mode_product(mode_product(x, old.mT, k), new, k)
    return mode_product(x, old.mT @ new, k)


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


def each(op, tensors: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    """``op`` (a ``torch._foreach_*`` function) over the tensors that are not ``None``, in one call; a ``None``
    (a mode without a spectrum) stays ``None`` in its place."""
    present = [t for t in tensors if t is not None]
    results = iter(op(present) if present else ())
    return [None if t is None else next(results) for t in tensors]


def broadcast_view(v: torch.Tensor, order: int, k: int) -> torch.Tensor:
    """``v`` (``(B, d_k)``) viewed to broadcast along mode ``k`` of an order-``order`` tensor; a ``v`` already of
    that order (e.g. ``ParamState.broadcast_spectra``) is returned as it is."""
    if v.ndim == order + 1:
        return v
    shape = [v.shape[0]] + [1] * order
    shape[k + 1] = v.shape[1]
    return v.view(shape)


def outer(vectors: Sequence[Optional[torch.Tensor]], shape: Sequence[int]) -> torch.Tensor:
    """Rank-one tensor ``⊗_k v_k`` of shape ``(B, d_1, …, d_N)``; a ``None`` entry is a vector of ones."""
    return broadcast_outer(vectors, len(shape) - 1).expand(*shape)


def broadcast_outer(vectors: Sequence[Optional[torch.Tensor]], order: int) -> torch.Tensor:
    """:func:`outer` before its final ``expand``: the product of the vectors' broadcast views, of size 1 along the
    modes whose entry is ``None`` (the same values wherever it is broadcast against a full tensor)."""
    result = None
    for k, v in enumerate(vectors):
        if v is None:
            continue
        view = broadcast_view(v, order, k)
        result = view if result is None else result * view
    if result is None:
        raise ValueError("outer() needs at least one vector")
    return result


def scale(x: torch.Tensor, vectors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``X ⊙ ⊗_k v_k`` (broadcast, no full-size outer product is materialised); ``None`` entries are ones. A
    ``v_k`` is ``(B, d_k)`` or already in its broadcast shape ``(B, 1, …, d_k, …, 1)``."""
    order = x.ndim - 1
    for k, v in enumerate(vectors):
        if v is not None:
            x = x * broadcast_view(v, order, k)
    return x


def _apply_low(x: torch.Tensor, bases: Sequence[Optional[torch.Tensor]], inverse: bool,
               operand_dtype: torch.dtype) -> torch.Tensor:
    """``fl(⋯fl(fl(X) ×_1 fl(Q_1)) ⋯) ×_N fl(Q_N)`` over the dense modes in order (``Q_kᵀ`` when ``inverse``), each
    product accumulated and returned in ``x.dtype`` (``fl``: rounding to ``operand_dtype``)."""
    out_dtype = x.dtype
    y = x
    for k, q in enumerate(bases):
        if q is None:
            continue
        if q.dtype != operand_dtype:  # a caller may pass bases rounded already (``Power`` rounds once per step)
            q = q.to(operand_dtype)
        y = _mode_product_low(y, q.mT if inverse else q, k, operand_dtype, out_dtype)
    return y


def _mode_product_low(x: torch.Tensor, a: torch.Tensor, k: int, operand_dtype: torch.dtype,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """``fl(X) ×_k A`` (``A`` already in ``operand_dtype``, ``(B, d_k, d_k)``) as one batched matmul: ``X`` is seen
    as ``(B, P, d_k, S)`` (``P``, ``S``: the sizes of the modes before and after ``k``)."""
    shape = x.shape
    batch, d = shape[0], shape[k + 1]
    before, after = math.prod(shape[1:k + 1]), math.prod(shape[k + 2:])
    if after == 1:  # last mode: X_(B,P,d) @ A
        out = _bmm(x.reshape(batch, before, d).to(operand_dtype), a, out_dtype)
    elif before == 1:  # first mode: Aᵀ @ X_(B,d,S)
        out = _bmm(a.mT, x.reshape(batch, d, after).to(operand_dtype), out_dtype)
    else:  # a middle mode: bring it last (one copy, fused with the rounding), multiply, put it back
        moved = x.reshape(batch, before, d, after).transpose(2, 3)
        moved = moved.to(operand_dtype, memory_format=torch.contiguous_format).reshape(batch, before * after, d)
        out = _bmm(moved, a, out_dtype).reshape(batch, before, after, d).transpose(2, 3)
    return out.reshape(shape)


def _bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` of two ``operand_dtype`` stacks, accumulated and returned in ``out_dtype``."""
    if a.device.type == "cuda" and out_dtype == torch.float32 and _cuda_out_dtype():
        return torch.bmm(a, b, out_dtype=out_dtype)
    return torch.bmm(a.to(out_dtype), b.to(out_dtype))  # exact products, accumulated in out_dtype


@functools.lru_cache(maxsize=1)
def _cuda_out_dtype() -> bool:
    """Whether this torch has ``bmm(..., out_dtype=)`` (CUDA: float32 results of bfloat16/float16 operands; torch
    ≥ 2.8). Read from the operator's overloads, so no kernel runs (this may first be asked inside a graph capture)."""
    return "dtype" in torch.ops.aten.bmm.overloads()
