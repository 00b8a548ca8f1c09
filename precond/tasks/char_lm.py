"""``CharLM``: a byte-level transformer language model on the standard library's sources (or ``data=FILE``)."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Optional

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from precond.tasks.base import SAMPLINGS, Batch, TokenWindows
from precond.tasks.corpus import fingerprint, read_corpus, split_tokens
from precond.tasks.gpt import TinyGPT
from precond.validators import number, one_of

VOCAB = 256
"""Byte-level vocabulary: every byte value is a token, so any text file works."""


@functools.lru_cache(maxsize=4)
def _load(task: "CharLM", device: str) -> TokenWindows:
    train, val = split_tokens(read_corpus(task.data, task.max_bytes), task.val_fraction)
    return TokenWindows(train.to(device), val.to(device), task.context, task.batch_size, task.sampling)


@attrs.frozen
class CharLM:
    """Next-byte prediction with :class:`precond.tasks.gpt.TinyGPT`; loss is cross entropy in nats per byte.

    - ``data``: a text file, or ``None`` for Python's standard library sources (no download);
    - ``max_bytes``: how much of the text to read; the last ``val_fraction`` of it is the validation split;
    - ``layers``, ``width``, ``heads``, ``context``: the model (tiny by default, for a fast CPU run);
    - ``batch_size``: sequences of ``context`` tokens per step;
    - ``sampling``: ``"random"`` windows at random offsets, or ``"epoch"`` disjoint windows in a shuffled order, so
      no training byte repeats while ``steps · batch_size · (context + 1)`` stays below the training text
      (:class:`precond.tasks.base.TokenWindows`).
    """

    name: ClassVar[str] = "char_lm"

    data: Optional[str] = None
    max_bytes: int = attrs.field(default=2_000_000, validator=number(
        low=1, integer=True, meaning="bytes of text read"))
    val_fraction: float = attrs.field(default=0.1, validator=number(
        low=0, high=1, low_open=True, high_open=True, meaning="share of the text held out for validation"))
    layers: int = attrs.field(default=2, validator=number(low=1, integer=True, meaning="transformer blocks"))
    width: int = attrs.field(default=64, validator=number(low=1, integer=True, meaning="model width"))
    heads: int = attrs.field(default=4, validator=number(low=1, integer=True, meaning="attention heads"))
    context: int = attrs.field(default=64, validator=number(low=1, integer=True, meaning="tokens per sequence"))
    batch_size: int = attrs.field(default=16, validator=number(low=1, integer=True, meaning="sequences per step"))
    sampling: str = attrs.field(default="random", validator=one_of(SAMPLINGS))

    def __attrs_post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")

    def settings(self) -> dict[str, Any]:
        """The options and the text's fingerprint; ``sampling`` only when it is not the default ``"random"``
        (added later: runs made before it keep their resume keys)."""
        options = attrs.asdict(self)
        if options["sampling"] == "random":
            del options["sampling"]
        return {"task": self.name, **options, "text": fingerprint(read_corpus(self.data, self.max_bytes))}

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyGPT(VOCAB, self.context, self.layers, self.width, self.heads)

    def load(self, device: torch.device) -> TokenWindows:
        return _load(self, str(device))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
