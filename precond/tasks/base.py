"""What a training task provides to the ablation runner, and the two batch samplers the built-in tasks share.

A task is a frozen attrs configuration (hashable, so its loaded data can be cached) with four methods:
``settings()`` (plain data identifying the data and the model, used in resume keys), ``build_model(seed)``
(on the CPU, initialised from ``seed``), ``load(device)`` (the data, on ``device``) and ``loss(model, batch)``.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]

VALIDATION_SEED = 20240917
"""Seed of the generator that draws the fixed validation batches (the same for every run and every seed)."""


class Data(Protocol):
    """A task's data on one device."""

    def train_batch(self, generator: torch.Generator) -> Batch:
        """The next training batch, drawn with ``generator`` (a CPU generator seeded by the run's seed)."""

    def val_batches(self, count: int) -> list[Batch]:
        """``count`` fixed validation batches (identical for every run)."""


class Task(Protocol):
    """A training problem the ablation runner can train any optimizer on."""

    name: str

    def settings(self) -> dict[str, Any]:
        """Everything that identifies the data and the model, as JSON-ready plain data."""

    def build_model(self, seed: int) -> nn.Module:
        """A freshly initialised model on the CPU; the same ``seed`` gives the same weights."""

    def load(self, device: torch.device) -> Data:
        """The data on ``device`` (cached: loading twice is free)."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar training / validation loss of ``model`` on ``batch``."""


SAMPLINGS = ("random", "epoch")
"""How training windows are drawn: at random offsets with replacement, or each disjoint window once per epoch."""


def stream(data: Any, generator: torch.Generator) -> Iterator[Batch]:
    """The training batches of one run: ``data.stream(generator)`` where the data has it, else ``train_batch``
    called again and again."""
    if hasattr(data, "stream"):
        return data.stream(generator)
    return iter(lambda: data.train_batch(generator), None)


class TokenWindows:
    """Windows of ``context + 1`` tokens from a 1-D token tensor: inputs and next-token targets.

    ``sampling="random"``: each training window starts at a uniformly random offset (windows may overlap and
    repeat). ``sampling="epoch"`` (through :meth:`stream`): the text is cut into ``⌊n/(context+1)⌋`` disjoint
    windows, visited in an order shuffled by the run's generator, so no training token is seen twice before all
    of them were seen once (then a new shuffled epoch starts).
    """

    def __init__(self, train: torch.Tensor, val: torch.Tensor, context: int, batch_size: int,
                 sampling: str = "random") -> None:
        if min(train.numel(), val.numel()) <= context + 1:
            raise ValueError(f"the text is too short for context {context}: {train.numel()} training and "
                             f"{val.numel()} validation tokens")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        self.train, self.val, self.context, self.batch_size = train, val, context, batch_size
        self.sampling = sampling
        self._val_cache: list[Batch] = []
        self._val_generator = torch.Generator().manual_seed(VALIDATION_SEED)

    def _windows(self, tokens: torch.Tensor, generator: torch.Generator) -> Batch:
        starts = torch.randint(0, tokens.numel() - self.context - 1, (self.batch_size,), generator=generator)
        index = starts.to(tokens.device)[:, None] + torch.arange(self.context + 1, device=tokens.device)
        window = tokens[index].long()
        return window[:, :-1], window[:, 1:]

    def train_batch(self, generator: torch.Generator) -> Batch:
        return self._windows(self.train, generator)

    def stream(self, generator: torch.Generator) -> Iterator[Batch]:
        """The run's training batches (``sampling`` decides how), drawn with ``generator``."""
        if self.sampling == "random":
            while True:
                yield self.train_batch(generator)
        length = self.context + 1
        count = self.train.numel() // length
        if count < self.batch_size:
            raise ValueError(f"epoch sampling needs at least batch_size ({self.batch_size}) windows of {length} "
                             f"tokens; the training text holds {count}")
        offsets = torch.arange(length, device=self.train.device)
        while True:
            order = torch.randperm(count, generator=generator)
            for first in range(0, count - self.batch_size + 1, self.batch_size):
                starts = order[first:first + self.batch_size].to(self.train.device) * length
                window = self.train[starts[:, None] + offsets].long()
                yield window[:, :-1], window[:, 1:]

    def val_batches(self, count: int) -> list[Batch]:
        while len(self._val_cache) < count:
            self._val_cache.append(self._windows(self.val, self._val_generator))
        return self._val_cache[:count]


class Examples:
    """Minibatches drawn with replacement from a fixed training set; validation in fixed consecutive slices."""

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 batch_size: int) -> None:
        self.x_train, self.y_train, self.x_val, self.y_val = x_train, y_train, x_val, y_val
        self.batch_size = batch_size

    def train_batch(self, generator: torch.Generator) -> Batch:
        index = torch.randint(0, self.x_train.shape[0], (self.batch_size,), generator=generator).to(self.x_train.device)
        return self.x_train[index], self.y_train[index]

    def val_batches(self, count: int) -> list[Batch]:
        available = self.x_val.shape[0] // self.batch_size
        if count > available:
            raise ValueError(f"{count} validation batches of {self.batch_size} need {count * self.batch_size} "
                             f"validation examples; the task has {self.x_val.shape[0]} (raise val_size)")
        return [(self.x_val[i * self.batch_size:(i + 1) * self.batch_size],
                 self.y_val[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(count)]

