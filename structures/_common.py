"""Helpers shared by the structures: axis names for einops patterns and the max-dim rule."""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import attrs

from precond.layout import ModeKind
from precond.validators import is_integer, one_of, plain_number

LargeModePolicy = Literal["none", "diagonal"]


def axis_names(shape: Sequence[int]) -> tuple[str, list[tuple[str, int]]]:
    """The left side of an einops pattern for ``shape`` (size-1 axes written ``1``) and the kept axes."""
    tokens, kept = [], []
    for i, size in enumerate(shape):
        if size == 1:
            tokens.append("1")
        else:
            tokens.append(f"d{i}")
            kept.append((f"d{i}", size))
    return " ".join(tokens), kept


def group(names: Sequence[str]) -> str:
    """einops token merging ``names`` into one axis (``1`` when empty)."""
    if not names:
        return "1"
    return names[0] if len(names) == 1 else "(" + " ".join(names) + ")"


def kind_for(size: int, max_dim: Optional[int], large: LargeModePolicy) -> ModeKind:
    """Dense if the mode fits ``max_dim``; otherwise the structure's large-mode policy."""
    if size <= 1:
        return "none"
    if max_dim is None or size <= max_dim:
        return "dense"
    return large


def positive_or_none(instance, attribute, value) -> None:
    if value is not None and (not is_integer(value) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer or None (no limit), got {value!r}")


max_dim_field = attrs.field(default=None, converter=plain_number, validator=positive_or_none)
large_field = attrs.field(default="none", validator=one_of(("none", "diagonal")))


VectorPolicy = Literal["diagonal", "dense"]
vectors_field = attrs.field(default="diagonal", validator=one_of(("diagonal", "dense")))


def vector_kinds(kinds: tuple[ModeKind, ...], vectors: VectorPolicy) -> tuple[ModeKind, ...]:
    """A weight that is a vector after dropping unit modes (bias, norm scale) gets a diagonal spectrum, not a
    dense ``d × d`` factor, unless ``vectors="dense"`` (SOAP's ``precondition_1d``)."""
    if len(kinds) == 1 and kinds[0] == "dense" and vectors == "diagonal":
        return ("diagonal",)
    return kinds


MergeDirection = Literal["first", "last"]
merge_field = attrs.field(default=None, validator=one_of(("first", "last"), optional=True))


def merged_groups(sizes: Sequence[int], max_dim: int, direction: MergeDirection) -> list[list[int]]:
    """Indices of ``sizes`` grouped into adjacent runs whose product stays ``≤ max_dim``, greedily.

    ``direction="first"`` starts at the first mode and grows a run while the product fits, then starts the next
    run (SOAP's ``merge_dims``, nikhilvyas/SOAP); ``"last"`` does the same from the last mode backwards (Meta's
    ``merge_small_dims`` with ``target_parameter_dimensionality=1``). A mode larger than ``max_dim`` stays alone.
    E.g. ``(24, 16)`` at 1024 → one run (384); ``(4, 5, 6)`` at 20 → ``[[0, 1], [2]]`` (20 × 6) either way;
    ``(3, 3, 3)`` at 9 → ``(9, 3)`` from the first, ``(3, 9)`` from the last.
    """
    order = list(range(len(sizes)))
    if direction == "last":
        order.reverse()
    groups: list[list[int]] = []
    product = 0
    for i in order:
        if groups and product * sizes[i] <= max_dim:
            groups[-1].append(i)
            product *= sizes[i]
        else:
            groups.append([i])
            product = sizes[i]
    if direction == "last":
        groups = [sorted(g) for g in reversed(groups)]
    return groups

