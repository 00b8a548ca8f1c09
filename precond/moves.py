"""Moving the parameters: decoupled weight decay and ``W ← W − η U``, for one bucket or for several at once.

The step of the fast configurations is bound by launches (GitHub issue #11, ``docs/benchmarks.md``), and moving the
parameters cost two or three ops per bucket (``η U``, the ``_foreach_sub_``, the decay). :class:`PendingMoves` holds
the updates of a ``step()``'s buckets back and moves them with one ``torch._foreach_*`` call per param group and
operation instead; every parameter entry sees the same arithmetic as when moved alone (the foreach ops are
elementwise). The updates held back are bounded (``limit`` entries), so the memory a step holds stays small.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch

from precond.layout import Layout
from precond.precision import in_dtype

Move = tuple[list[torch.Tensor], torch.Tensor, Any]
"""``(params, update, layout)``: a bucket's parameters, its update ``(B, *view)`` and its ``Layout`` (or any object
with ``unview``, e.g. a distributed shard's row view)."""


def move(group: dict[str, Any], moves: Sequence[Move], lr: Union[float, torch.Tensor, None] = None) -> None:
    """Decoupled weight decay and ``W ← W − η U`` for every move (all of ``group``): ``η U`` is formed in the update's
    dtype and cast to the parameters' dtype last (one arithmetic path for a float and a tensor ``lr``; ``lr``
    overrides the group's). ``decay_order="before"`` decays first (AdamW), ``"after"`` last (SOAP)."""
    lr, wd = group["lr"] if lr is None else lr, group["weight_decay"]
    updates = [update for _, update, _ in moves]
    if isinstance(lr, torch.Tensor):
        scaled = [u * lr.to(device=u.device, dtype=u.dtype) for u in updates]
    else:
        scaled = torch._foreach_mul(updates, lr)  # u * lr for each, one op
    params, steps = [], []
    for (members, _, layout), s in zip(moves, scaled, strict=True):
        s = in_dtype(s, members[0].dtype)
        params += members
        steps += layout.unstack(s) if isinstance(layout, Layout) else [layout.unview(u) for u in s.unbind(0)]
    if wd and group["decay_order"] == "before":
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_sub_(params, steps)
    if wd and group["decay_order"] == "after":
        torch._foreach_mul_(params, 1 - lr * wd)


class PendingMoves:
    """The moves of one ``step()``, held back and made per param group with :func:`move` at :meth:`flush` (or as
    soon as the updates held reach ``limit`` entries)."""

    def __init__(self, limit: int = 1 << 22) -> None:
        self.limit = limit
        self._groups: dict[int, tuple[dict[str, Any], list[Move]]] = {}
        self._held = 0

    def add(self, group: dict[str, Any], params: list[torch.Tensor], update: torch.Tensor, layout: Any) -> None:
        self._groups.setdefault(id(group), (group, []))[1].append((params, update, layout))
        self._held += update.numel()
        if self._held >= self.limit:
            self.flush()

    def flush(self) -> None:
        """Make every held move (one :func:`move` per param group) and hold nothing."""
        groups, self._groups, self._held = self._groups, {}, 0
        for group, moves in groups.values():
            move(group, moves)
