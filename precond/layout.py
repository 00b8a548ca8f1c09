"""The plan a structure makes for one parameter: how it is viewed and what each mode gets (:class:`Layout`), and,
for a parameter a structure cuts into blocks, the plan of its blocks (:class:`Blocks`, :func:`split_sizes`; the
rule is in ``precond.blocking``)."""

from __future__ import annotations

import collections
import functools
import itertools
import math
import re
from typing import Literal, Sequence

import attrs
import einops
import torch

__all__ = ["Blocks", "Layout", "ModeKind", "split_sizes"]

ModeKind = Literal["dense", "diagonal", "none"]
"""What a mode of the viewed gradient gets:

- ``dense``: a factor ``S_k`` (``d_k × d_k``), an eigenbasis ``Q_k`` and a spectrum ``λ_k``;
- ``diagonal``: only a spectrum ``λ_k`` in the fixed basis ``Q_k = I`` (Claim 3 with ``Q = I``);
- ``none``: identity, nothing is stored (``S_k = I``, ``λ_k = 1``).
"""


@attrs.frozen
class Layout:
    """How one parameter is preconditioned; built by a structure, read by everything else.

    ``view_shape`` is the shape of the gradient after the structure's reshape (size-1 modes dropped,
    modes merged); ``kinds[k]`` says what mode ``k`` of that view gets.
    """

    shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    kinds: tuple[ModeKind, ...]
    pattern: str = attrs.field(kw_only=True)
    """``einops`` pattern from the parameter's axes ``d0 d1 …`` (unit axes written ``1``) to the view."""

    def __attrs_post_init__(self) -> None:
        if math.prod(self.shape) != math.prod(self.view_shape):
            raise ValueError(
                f"view {self.view_shape} does not hold the {math.prod(self.shape)} entries of {self.shape}"
            )
        if len(self.kinds) != len(self.view_shape):
            raise ValueError("one kind per viewed mode is needed")

    @property
    def order(self) -> int:
        return len(self.view_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.view_shape)

    @property
    def dense_modes(self) -> tuple[int, ...]:
        return tuple(k for k, kind in enumerate(self.kinds) if kind == "dense")

    @property
    def spectral_modes(self) -> tuple[int, ...]:
        """Modes that carry a spectrum ``λ_k`` (dense or diagonal)."""
        return tuple(k for k, kind in enumerate(self.kinds) if kind != "none")

    def complement(self, k: int) -> int:
        """``D_{-k} = ∏_{j≠k} d_j`` of the viewed tensor."""
        return self.numel // self.view_shape[k]

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """Parameter-shaped tensor → viewed tensor (``einops.rearrange`` with the structure's pattern; a plain
        ``reshape`` when the pattern keeps the axes in order, as every structure's does unless it transposes)."""
        if self.keeps_order:
            return tensor.reshape((*tensor.shape[: tensor.ndim - len(self.shape)], *self.view_shape))
        return einops.rearrange(tensor, self.pattern, **self.axis_lengths)

    def unview(self, tensor: torch.Tensor) -> torch.Tensor:
        """Viewed tensor → parameter shape (the pattern read backwards)."""
        if self.keeps_order:
            return tensor.reshape((*tensor.shape[: tensor.ndim - len(self.view_shape)], *self.shape))
        left, right = self.pattern.split("->")
        return einops.rearrange(tensor, f"{right.strip()} -> {left.strip()}", **self.axis_lengths)

    def stack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parameter-shaped tensors → one viewed stack ``(B, *view_shape)`` (the same values as stacking each
        :meth:`view`): when the view is a plain reshape and the tensors are contiguous, one ``stack`` and one
        ``reshape`` (a view) instead of one ``reshape`` per tensor; no ``reshape`` when the view is the shape itself."""
        if self.keeps_order and all(t.is_contiguous() for t in tensors):
            stacked = torch.stack(list(tensors))
            return stacked if self.is_identity else stacked.reshape(len(tensors), *self.view_shape)
        return torch.stack([self.view(t) for t in tensors])

    def unstack(self, stacked: torch.Tensor) -> Sequence[torch.Tensor]:
        """A viewed stack ``(B, *view_shape)`` → its ``B`` entries in the parameter's shape (the same values as
        :meth:`unview` of each entry): one ``reshape`` and one ``unbind`` when the view is a plain reshape, the
        ``unbind`` alone when it is the shape itself."""
        if self.keeps_order:
            return (stacked if self.is_identity else stacked.reshape(stacked.shape[0], *self.shape)).unbind(0)
        return [self.unview(t) for t in stacked.unbind(0)]

    @functools.cached_property
    def is_identity(self) -> bool:
        """The view is the parameter's shape itself (a plain reshape to the same shape: nothing to do)."""
        return self.keeps_order and tuple(self.view_shape) == tuple(self.shape)

    @functools.cached_property
    def keeps_order(self) -> bool:
        """The pattern only drops unit axes and merges neighbours: the view is a row-major ``reshape``."""
        left, right = (re.findall(r"d\d+", side) for side in self.pattern.split("->"))
        return left == right

    @property
    def axis_lengths(self) -> dict[str, int]:
        return {f"d{i}": s for i, s in enumerate(self.shape) if s != 1}

    def with_kinds(self, kinds: tuple[ModeKind, ...]) -> "Layout":
        return attrs.evolve(self, kinds=kinds)

    def describe(self) -> str:
        parts = []
        for d, kind in zip(self.view_shape, self.kinds, strict=True):
            parts.append({"dense": f"{d}:dense", "diagonal": f"{d}:diag", "none": f"{d}:-"}[kind])
        return f"{tuple(self.shape)} -> [{' x '.join(parts)}]"

    def state_numel(self) -> int:
        """Entries of the factor state this layout needs (``S_k`` and ``Q_k`` for dense modes, ``λ_k``)."""
        total = 0
        for d, kind in zip(self.view_shape, self.kinds, strict=True):
            if kind == "dense":
                total += 2 * d * d + d
            elif kind == "diagonal":
                total += d
        return total


def split_sizes(d: int, size: int) -> tuple[int, ...]:
    """Block lengths of an axis of length ``d`` cut into blocks of ``size`` (the last one shorter): ``torch.split``'s
    rule, e.g. ``(7, 3) → (3, 3, 1)``; an axis with ``d ≤ size`` stays whole."""
    full, rest = divmod(d, size)
    return (size,) * full + ((rest,) if rest else ())


@attrs.frozen
class Blocks:
    """The plan of a blocked parameter: ``splits[a]`` are the block lengths along axis ``a`` of ``shape``, and
    ``layouts[i]`` the layout of block ``i`` (row-major order over the block grid)."""

    shape: tuple[int, ...]
    splits: tuple[tuple[int, ...], ...]
    layouts: tuple[Layout, ...]

    def __attrs_post_init__(self) -> None:
        if tuple(sum(s) for s in self.splits) != tuple(self.shape):
            raise ValueError(f"block lengths {self.splits} do not cut the axes of {self.shape}")
        if len(self.layouts) != math.prod(len(s) for s in self.splits):
            raise ValueError("one layout per block is needed")

    @property
    def count(self) -> int:
        return len(self.layouts)

    def slices(self) -> list[tuple[slice, ...]]:
        """The index of each block into the parameter (row-major order over the grid)."""
        per_axis = []
        for sizes in self.splits:
            starts = itertools.accumulate((0, *sizes))
            # starts has one entry more than sizes (the axis's end)
            per_axis.append([slice(a, a + s) for a, s in zip(starts, sizes, strict=False)])
        return list(itertools.product(*per_axis))

    def pieces(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of ``tensor`` (parameter-shaped) as views."""
        return [tensor[index] for index in self.slices()]

    def with_layouts(self, layouts: Sequence[Layout]) -> "Blocks":
        return attrs.evolve(self, layouts=tuple(layouts))

    def state_numel(self) -> int:
        return sum(layout.state_numel() for layout in self.layouts)

    def describe(self) -> str:
        """``shape`` → the block grid, then each distinct block layout with its count."""
        counts = collections.Counter(layout.describe() for layout in self.layouts)
        grid = "x".join(str(len(s)) for s in self.splits)
        return f"{tuple(self.shape)} blocked {grid}: " + ", ".join(f"{n} × {d}" for d, n in counts.items())
