"""Several optimizers over disjoint parameters, driven as one ``torch.optim.Optimizer``.

``torch.optim.Muon`` takes only matrices, so a network needs a second optimizer (AdamW) for its vectors, embeddings
and head. :class:`Combined` puts both behind one ``step()``, ``zero_grad()`` and ``state_dict()``. Its
``param_groups`` is the list of the parts' own group dicts (the same objects, not copies), so a learning-rate
scheduler that writes ``group["lr"]`` reaches every part; ``state`` reads the parts' states.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import torch


class Combined(torch.optim.Optimizer):
    """The optimizers ``parts`` over disjoint parameter sets, stepped in order as one optimizer."""

    def __init__(self, parts: Sequence[torch.optim.Optimizer]) -> None:
        parts = tuple(parts)
        if not parts:
            raise ValueError("Combined needs at least one optimizer")
        params = [p for part in parts for group in part.param_groups for p in group["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("the optimizers given to Combined share a parameter; each parameter must have one owner")
        super().__init__([{"params": params}], defaults={})
        self.parts = parts
        self.param_groups = [group for part in parts for group in part.param_groups]
        self.state = collections.ChainMap(*(part.state for part in parts))  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("parts")
        if not isinstance(saved, list) or len(saved) != len(self.parts):
            raise ValueError(f"this Combined optimizer has {len(self.parts)} parts; the state dict holds "
                             f"{'no parts' if not isinstance(saved, list) else len(saved)}")
        for part, state in zip(self.parts, saved, strict=True):
            part.load_state_dict(state)
