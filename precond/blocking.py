"""Blocking of modes above ``max_dim`` (Meta's Distributed Shampoo, ``max_preconditioner_dim``).

A structure that blocks (``structures.NMode(max_dim=b, large="block")``) cuts every parameter axis of length
``d > b`` into ``⌈d/b⌉`` consecutive blocks of ``b`` entries, the last one ``d − b(⌈d/b⌉ − 1)`` long (``torch.split``
with ``b``), and every other axis not at all. A weight ``W ∈ R^{d_1×…×d_N}`` becomes the grid of blocks
``W[i_1, …, i_N]`` (row-major order over the grid), and each block is preconditioned as a parameter of its own:

    U(W)[i] = U_i(G[i])    for every block index i,

with its own factors ``S_k^{(i)}`` (``≤ b × b``), bases, spectra, momentum, graft state and step count
(facebookresearch/optimizers, ``distributed_shampoo``: ``multi_dim_split`` and one preconditioner per block).
Merging (``merge=...``) is decided on the whole parameter first, as Meta does; an axis above ``b`` is never merged,
so the blocks of a merged view are the blocks of the raw axes, each viewed with the parent's grouping.

:class:`Blocks` is the plan (what a structure's ``blocks(shape)`` returns; it lives in the kernel,
``precond.layout``, with :func:`split_sizes`); :class:`Members` is the optimizer's book of the *pieces*: views of each
blocked parameter (``p.detach()[slices]``, so an update written into a piece lands in ``p``), which the buckets stack
as members like any parameter (equal blocks of many parameters share one bucket). A blocked parameter's
``optimizer.state[p]`` is ``{"blocks": {"0": state_0, "1": state_1, …}}``, each ``state_i`` the usual per-parameter
state (``precond.state``) of block ``i``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from precond.layout import Blocks, Layout, split_sizes
from precond.state import BLOCKS

__all__ = ["Blocks", "Members", "MemberStates", "split_sizes"]  # Blocks, split_sizes: the plan, in precond.layout

if TYPE_CHECKING:
    from precond.preconditioner import Preconditioner


class Members:
    """What the optimizer's buckets stack: every parameter as it is, or each block of a blocked one as a *piece*
    (a view of the parameter), with its layout and its state dict. The piece views are made once per parameter and
    made again when the parameter's storage was replaced (``p.data = …``); :attr:`changed` then tells the optimizer
    to rebuild its buckets."""

    def __init__(self) -> None:
        self._views: dict[int, tuple[torch.Tensor, tuple, Blocks, list[torch.Tensor]]] = {}
        self._owner: dict[int, tuple[torch.Tensor, torch.Tensor, int, Layout]] = {}  # id(view) → (view, p, i, layout)
        self._plans: dict[int, tuple[torch.Tensor, Any, torch.Size, Optional[Blocks]]] = {}
        self.changed = False

    def _blocks(self, p: torch.Tensor, preconditioner: "Preconditioner") -> Optional[Blocks]:
        """``preconditioner.blocks(p.shape)``, remembered per parameter (asked every step, hashing nothing)."""
        known = self._plans.get(id(p))
        if known is not None and known[0] is p and known[1] is preconditioner and known[2] == p.shape:
            return known[3]
        blocks = preconditioner.blocks(p.shape)
        self._plans[id(p)] = (p, preconditioner, p.shape, blocks)
        return blocks

    def pieces(self, p: torch.Tensor, preconditioner: "Preconditioner") -> Optional[list[torch.Tensor]]:
        """The piece views of ``p``, or None when its plan does not block it."""
        blocks = self._blocks(p, preconditioner)
        if blocks is None:
            return None
        where = (p.data_ptr(), tuple(p.shape), p.stride(), p.dtype, p.device)
        cached = self._views.get(id(p))
        if cached is not None and cached[0] is p and cached[1] == where and cached[2] is blocks:
            return cached[3]
        if cached is not None:
            for old in cached[3]:
                self._owner.pop(id(old), None)
            self.changed = True
        views = blocks.pieces(p.detach())
        self._views[id(p)] = (p, where, blocks, views)
        for i, (view, layout) in enumerate(zip(views, blocks.layouts, strict=True)):
            self._owner[id(view)] = (view, p, i, layout)
        return views

    def owner(self, member: torch.Tensor) -> Optional[tuple[torch.Tensor, int]]:
        """``(p, i)`` when ``member`` is block ``i`` of ``p``, None for a parameter."""
        found = self._owner.get(id(member))
        return None if found is None or found[0] is not member else (found[1], found[2])

    def of_group(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """The members of a param group, in parameter order (each blocked parameter's pieces in block order)."""
        out = []
        for p in group["params"]:
            views = self.pieces(p, group["preconditioner"])
            out.extend([p] if views is None else views)
        return out

    def layout(self, member: torch.Tensor, preconditioner: "Preconditioner") -> Layout:
        found = self._owner.get(id(member))
        return preconditioner.plan(member.shape) if found is None or found[0] is not member else found[3]

    def expand(self, work: Iterable[tuple[dict[str, Any], torch.Tensor, torch.Tensor]]):
        """``(group, p, grad)`` → ``(group, member, grad of the member)``: a blocked parameter gives one entry per
        block, with the matching view of its gradient."""
        out = []
        for group, p, grad in work:
            views = self.pieces(p, group["preconditioner"])
            if views is None:
                out.append((group, p, grad))
                continue
            blocks = self._views[id(p)][2]
            out.extend((group, view, g) for view, g in zip(views, blocks.pieces(grad), strict=True))
        return out

    def states(self, state: dict) -> "MemberStates":
        return MemberStates(self, state)


class MemberStates:
    """The state dict of each member: ``state[p]`` for a parameter, ``state[p]["blocks"][str(i)]`` for block ``i``
    of ``p`` (made on first write, as ``torch.optim``'s ``defaultdict``)."""

    def __init__(self, members: Members, state: dict) -> None:
        self.members = members
        self.state = state

    def __getitem__(self, member: torch.Tensor) -> dict[str, Any]:
        owner = self.members.owner(member)
        if owner is None:
            return self.state[member]
        p, i = owner
        return self.state[p].setdefault(BLOCKS, {}).setdefault(str(i), {})

    def get(self, member: torch.Tensor) -> Optional[dict[str, Any]]:
        owner = self.members.owner(member)
        if owner is None:
            return self.state.get(member)
        p, i = owner
        return self.state.get(p, {}).get(BLOCKS, {}).get(str(i))
