"""The fenced Python blocks of a Markdown file, for the tests that run them (``tests/test_readme.py``,
``tests/test_wheel.py``).

A block that cannot run on a CPU in one process (it needs a CUDA device, or a ``torchrun`` launch) starts with a
comment line ``# readme-test: skip, <reason>``; the tests skip it and report the reason. Every other block runs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SKIP_MARKER = "# readme-test: skip"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Block:
    """One ```` ```python ```` block: its code, the line of its opening fence (1-based) and the heading above it."""

    code: str
    line: int
    heading: str

    @property
    def skip_reason(self) -> Optional[str]:
        """The reason after ``# readme-test: skip`` on the block's first line, or None for a block that runs."""
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        if not first.startswith(SKIP_MARKER):
            return None
        return first[len(SKIP_MARKER):].lstrip(" ,:—-") or "marked skip"

    @property
    def lines(self) -> int:
        """Lines of code, blank lines and comment-only lines included (what a reader sees)."""
        return len(self.code.rstrip("\n").splitlines())

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"line{self.line}-{slug}"


def python_blocks(path: pathlib.Path = README) -> list[Block]:
    """Every ```` ```python ```` block of ``path`` in order (a fence inside another fence is not expected)."""
    text = path.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(1)) for m in _HEADING.finditer(text) if not _inside_fence(text, m.start())]
    blocks = []
    for match in _FENCE.finditer(text):
        above = [title for start, title in headings if start < match.start()]
        blocks.append(Block(code=match.group(1), line=text.count("\n", 0, match.start()) + 1,
                            heading=above[-1] if above else "top"))
    return blocks


def _inside_fence(text: str, position: int) -> bool:
    """Whether ``position`` lies inside a fenced block (a ``# comment`` in code is no heading)."""
    return text.count("\n```", 0, position) % 2 == 1
