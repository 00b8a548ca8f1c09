"""The per-parameter state: its storage layout (the only module that spells its keys) and a typed view of it.

Storage, per parameter (``optimizer.state[p]``, what ``state_dict`` saves; unchanged since the first release)::

    {"step": 0-d float32 tensor,
     "estimator": {"S": {"k": S_k}, "lambda": {"k": λ_k}, **the estimator's own tensors (e.g. "V")},
     "basis": {"Q": {"k": Q_k}},
     "applier": {**the applier's own tensors (e.g. a graft's "v")},
     "momentum": m (only with momentum > 0)}

A parameter cut into blocks (``precond.blocking``) keeps ``{"blocks": {"i": the storage above of block i}}``.
``k`` is the viewed mode as a string; a mode without a factor (or spectrum) has no entry. Inside a bucket every
tensor carries a leading batch axis ``B`` and each parameter's entries are views of its slice.
:class:`ParamState` gives the parts lists indexed by mode (``None`` where absent) that are *views* of the storage:
writing into ``ps.S[k]`` writes the optimizer's state.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
import torch

from precond.contractions import broadcast_view
from precond.layout import Layout

Tensors = list[Optional[torch.Tensor]]
STEP = "step"
MOMENTUM = "momentum"
BLOCKS = "blocks"
"""A blocked parameter's state (``precond.blocking``): ``{"blocks": {"0": state of block 0, …}}``."""


def _keyed(tensors: Tensors) -> dict[str, torch.Tensor]:
    return {str(k): t.contiguous() for k, t in enumerate(tensors) if t is not None}


def _unkeyed(keyed: dict[str, torch.Tensor], order: int) -> Tensors:
    return [keyed.get(str(k)) for k in range(order)]


def _own(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}


@attrs.define(eq=False)
class ParamState:
    """Typed view of one (batched) parameter state: ``Q[k]``, ``S[k]``, ``lam[k]`` per viewed mode, the estimator's
    and the applier's own tensors, and the momentum ``m``. Built with :meth:`of` (views of a storage dict) or
    :meth:`empty` (a new state); :meth:`storage` gives the dict to keep."""

    Q: Tensors
    S: Tensors
    lam: Tensors
    estimator: dict[str, torch.Tensor] = attrs.field(factory=dict)
    applier: dict[str, torch.Tensor] = attrs.field(factory=dict)
    momentum: Optional[torch.Tensor] = None
    params: tuple[torch.Tensor, ...] = ()
    """The parameters whose state this is, in batch order (empty for a copied subset, e.g. a refresh's): for parts
    whose statistics come from elsewhere than the gradient (K-FAC's layer inputs, captured by module hooks)."""
    _broadcast: dict[int, tuple[torch.Tensor, torch.Tensor]] = attrs.field(factory=dict, init=False, repr=False)

    def broadcast_spectra(self) -> Tensors:
        """``λ_k`` viewed as ``(B, 1, …, d_k, …, 1)`` (mode ``k`` of a ``(B, *view)`` tensor; ``None`` stays), the
        shape in which ``precond.contractions.scale`` broadcasts it. The views share ``λ_k``'s storage (in-place
        writes show through) and are made once, then kept while ``lam[k]`` is the same tensor: no view op per step."""
        order, out = len(self.lam), []
        for k, lam in enumerate(self.lam):
            kept = self._broadcast.get(k)
            if lam is not None and (kept is None or kept[0] is not lam):
                kept = self._broadcast[k] = (lam, broadcast_view(lam, order, k))
            out.append(None if lam is None else kept[1])
        return out

    @classmethod
    def of(cls, storage: dict[str, Any], layout: Layout, params: tuple[torch.Tensor, ...] = ()) -> "ParamState":
        estimator = storage["estimator"]
        # an empty group ({} for a vector's S and Q) may be missing: flattening checkpointers (DCP) drop empty dicts
        return cls(
            Q=_unkeyed(storage.get("basis", {}).get("Q", {}), layout.order),
            S=_unkeyed(estimator.get("S", {}), layout.order),
            lam=_unkeyed(estimator.get("lambda", {}), layout.order),
            estimator=_own(estimator),
            applier=_own(storage.get("applier", {})),
            momentum=storage.get(MOMENTUM),
            params=params,
        )

    @classmethod
    def empty(cls, layout: Layout, needs_factors: bool, batch: int, dtype: torch.dtype,
              device: torch.device, params: tuple[torch.Tensor, ...] = ()) -> "ParamState":
        """Zero factors ``S_k`` for dense modes (when the basis needs them), zero spectra for every mode with one,
        no bases yet."""
        S: Tensors = [None] * layout.order
        lam: Tensors = [None] * layout.order
        for k, (d, kind) in enumerate(zip(layout.view_shape, layout.kinds, strict=True)):
            if kind == "dense" and needs_factors:
                S[k] = torch.zeros(batch, d, d, dtype=dtype, device=device)
            if kind != "none":
                lam[k] = torch.zeros(batch, d, dtype=dtype, device=device)
        return cls(Q=[None] * layout.order, S=S, lam=lam, params=params)

    def storage(self) -> dict[str, Any]:
        """The storage dict (contiguous tensors) of this state, in the checkpoint layout."""
        out: dict[str, Any] = {
            "estimator": {"S": _keyed(self.S), "lambda": _keyed(self.lam),
                          **{name: t.contiguous() for name, t in self.estimator.items()}},
            "basis": {"Q": _keyed(self.Q)},
            "applier": {name: t.contiguous() for name, t in self.applier.items()},
        }
        if self.momentum is not None:
            out[MOMENTUM] = self.momentum
        return out

    def of_mode(self, k: int, momentum: bool = False) -> "ParamState":
        """What a refresh of mode ``k`` reads and writes: ``S_k``, ``Q_k``, every mode's ``λ_j`` and the estimator's
        own tensors (a dense ``V`` follows a permuted basis, or is reset to ``⊗_j λ_j``: EKFAC resets it from the
        current spectrum of *every* mode when one mode refreshes, so a staggered refresh of a part of a bucket
        gives what a refresh of the whole bucket, or of a bucket of its own, gives); nothing of the other modes'
        factors or bases or the applier, and the momentum only with ``momentum`` (kept in the bases, it moves with
        them: ``Preconditioner(momentum_in_basis=True)``)."""
        only = lambda items: [t if j == k else None for j, t in enumerate(items)]  # noqa: E731
        return ParamState(Q=only(self.Q), S=only(self.S), lam=list(self.lam), estimator=dict(self.estimator),
                          momentum=self.momentum if momentum else None)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "ParamState":
        apply = lambda items: [None if t is None else fn(t) for t in items]  # noqa: E731
        return ParamState(Q=apply(self.Q), S=apply(self.S), lam=apply(self.lam),
                          estimator={n: fn(t) for n, t in self.estimator.items()},
                          applier={n: fn(t) for n, t in self.applier.items()},
                          momentum=None if self.momentum is None else fn(self.momentum))

    def pairs(self, other: "ParamState") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(mine, theirs)`` for every tensor ``other`` holds (``other`` a :meth:`map` of a subset of this state)."""
        out = [(a, b) for mine, theirs in ((self.Q, other.Q), (self.S, other.S), (self.lam, other.lam))
               for a, b in zip(mine, theirs, strict=True) if b is not None]
        out += [(self.estimator[n], t) for n, t in other.estimator.items()]
        out += [(self.applier[n], t) for n, t in other.applier.items()]
        if other.momentum is not None:
            out.append((self.momentum, other.momentum))
        return out


def new_step(device: Optional[torch.device] = None) -> torch.Tensor:
    """The per-parameter step count as stored: a 0-d float32 tensor (``torch.optim``'s convention)."""
    return torch.zeros((), dtype=torch.float32, device=device)


def read_step(storage: dict[str, Any]) -> int:
    """The number of updates a stored state has seen (a tensor, or a plain number from an older checkpoint)."""
    step = storage[STEP]
    return int(step.item()) if isinstance(step, torch.Tensor) else int(step)


def map_leaves(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor leaf of a nested state (dicts of dicts of tensors)."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {key: map_leaves(value, fn) for key, value in state.items()}
    return state


def state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors ``optimizer.state`` holds (nested dicts, lists and tuples), each distinct view counted
    once: views of one stacked bucket tensor add up to the stack, and the same view reached twice counts once. The
    one state-size measure of the library (the distributed stats, the benches and the workbench report it)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0

    def visit(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(list(optimizer.state.values()))
    return total
