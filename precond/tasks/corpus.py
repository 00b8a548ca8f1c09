"""The text the character-level LM trains on: Python's own standard library sources, or any text file.

No download: the default corpus is the ``.py`` files next to ``os.py``, read in sorted path order (``site-packages``
and ``dist-packages`` skipped, so installed packages never change it) until ``max_bytes``. The text is kept as
bytes, so the vocabulary is the 256 byte values and any file works.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

_SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources(root: Optional[str] = None) -> Iterator[Path]:
    """The standard library's ``.py`` files under ``root`` (default: the directory of ``os.py``), sorted by path."""
    root = root or os.path.dirname(os.__file__)
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _SKIPPED_DIRECTORIES)
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(directory) / name


@functools.lru_cache(maxsize=4)
def read_corpus(path: Optional[str], max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of the file ``path``, or of the standard library sources concatenated."""
    if path is not None:
        with open(path, "rb") as handle:
            text = handle.read(max_bytes)
        if not text:
            raise ValueError(f"the text file {path!r} is empty")
        return text
    chunks, size = [], 0
    for source in stdlib_sources():
        chunk = source.read_bytes()
        chunks.append(chunk[: max_bytes - size])
        size += len(chunks[-1])
        if size >= max_bytes:
            break
    return b"".join(chunks)


def fingerprint(text: bytes) -> str:
    """A short content hash, so a resume key changes whenever the text does (another Python, another file)."""
    return hashlib.sha1(text).hexdigest()[:12]


def split_tokens(text: bytes, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens (``uint8``) split deterministically: the last ``val_fraction`` of the text is validation."""
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut].clone(), tokens[cut:].clone()
