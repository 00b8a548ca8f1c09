"""The one problem every battery entry trains: a tiny float64 model with parameters of orders 1 to 4.

``Tiny`` has two ``nn.Linear(4, 5)`` (a stacked pair), a ``LayerNorm`` (vectors), a ``Conv2d`` (an order-4 kernel),
a free order-3 parameter and a head ``nn.Linear(7, 3)`` whose input side is above ``MAX_DIM`` (a mode without a
dense factor, or cut into blocks with ``large="block"``). Every gradient comes from a real backward pass (the
gradient hooks of ``overlap_backward`` and K-FAC's layer captures see it), and at the steps in ``SKIPPED`` a branch
of the model is left out of the loss, so its parameters have no gradient (a stacked bucket is split).

Every run steps ``STEPS = 2·EVERY + 1`` steps, so each factor is refreshed twice (with or without stagger).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

DTYPE = torch.float64
MAX_DIM = 6
EVERY = 2
STEPS = 2 * EVERY + 1
LR = 1e-2
SKIPPED = {2: ("conv",), 4: ("b",)}
"""Step → branches of ``Tiny`` left out of the loss (their parameters get no gradient that step)."""


class Tiny(nn.Module):
    """See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.conv = nn.Conv2d(2, 3, 2)
        self.mix = nn.Parameter(torch.randn(3, 2, 2) / 2)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor, image: torch.Tensor, skip: tuple[str, ...] = ()) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if "b" not in skip:
            h = h + torch.tanh(self.b(x))
        out = self.head(torch.cat([self.norm(h), x[:, :2]], dim=1))
        if "conv" not in skip:
            out = out + torch.einsum("nchw,chw->nc", torch.tanh(self.conv(image)), self.mix)
        return out


def make_model(seed: int = 0) -> Tiny:
    """The model, the same on every call (and on every rank)."""
    torch.manual_seed(seed)
    return Tiny().to(DTYPE)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, images and targets of ``step`` (8 examples: more than any viewed mode, so factors fill up)."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 4, generator=gen, dtype=DTYPE)
    image = torch.randn(8, 2, 3, 3, generator=gen, dtype=DTYPE)
    target = torch.randn(8, 3, generator=gen, dtype=DTYPE)
    return x, image, target


def backward(model: Tiny, step: int, skip: Optional[tuple[str, ...]] = None) -> torch.Tensor:
    """Gradients of step ``step`` (set to None first, so a skipped branch has none); returns the loss."""
    for p in model.parameters():
        p.grad = None
    x, image, target = batch(step)
    loss = (model(x, image, SKIPPED.get(step, ()) if skip is None else skip) - target).pow(2).mean()
    loss.backward()
    return loss.detach()


def train(model: Tiny, optimizer: torch.optim.Optimizer, steps: range,
          corrupt: Optional[Callable[[Tiny, int], Any]] = None) -> None:
    """Backward and step for each of ``steps`` (1-based step numbers); ``corrupt(model, step)`` may change the
    gradients between the two."""
    for step in steps:
        backward(model, step)
        if corrupt is not None:
            corrupt(model, step)
        optimizer.step()


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's parameters by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}
