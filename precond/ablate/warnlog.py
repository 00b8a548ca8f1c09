"""Warnings raised during the runs, collected and shown once per kind instead of once per occurrence.

A run of the demo can raise the same library warning hundreds of times (every refresh, every run, from two worker
processes), each printed by Python with the source line it points at. Here every run collects its warnings
(:func:`collect`): a kind is its category and the place that raised it (file and line), counted, with the text of
its first occurrence. The kinds travel in the run's record (``warnings``), so worker processes need no shared
state; the parent (:class:`Digest`) logs a kind the first time any run raises it, one short line, and the summary
lists every kind with its count and the variants that raised it.

Python's default filters still apply (deprecation, import and resource warnings stay ignored); every other
warning is counted, not only the first per place.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

IGNORED_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
"""The categories Python's default filters hide outside ``__main__``; hidden here too."""

MESSAGE_CHARS = 240
"""A kind's first message is kept up to this many characters."""


def _where(filename: str, lineno: int) -> str:
    """``package/module.py:123`` (the path from the last ``site-packages`` or the repository's package on)."""
    parts = filename.replace(os.sep, "/").split("/")
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor):]
            break
    else:
        for package in ("precond", "structures", "estimators", "bases", "torch"):
            if package in parts:
                parts = parts[parts.index(package):]
                break
        else:
            parts = parts[-2:]
    return f"{'/'.join(parts)}:{lineno}"


@contextlib.contextmanager
def collect() -> Iterator[list[dict[str, Any]]]:
    """Count the warnings raised in the block by kind; the list it yields is filled with ``{"category",
    "where", "message", "count"}`` per kind, in order of first occurrence. Nothing is printed."""
    kinds: dict[tuple[str, str], dict[str, Any]] = {}
    found: list[dict[str, Any]] = []

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        where = _where(str(filename), int(lineno))
        key = (category.__name__, where)
        if key not in kinds:
            kinds[key] = {"category": category.__name__, "where": where,
                          "message": " ".join(str(message).split())[:MESSAGE_CHARS], "count": 0}
            found.append(kinds[key])
        kinds[key]["count"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for category in IGNORED_BY_DEFAULT:
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = show  # catch_warnings restores the previous one
        yield found


def kind_key(kind: dict[str, Any]) -> tuple[str, str]:
    return kind["category"], kind["where"]


class Digest:
    """The warnings of many runs: :meth:`add` takes a finished record and returns the log lines of the kinds no
    earlier run raised; :meth:`markdown` lists every kind for the summary."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, record: dict[str, Any], label: str = "") -> list[str]:
        lines = []
        for kind in record.get("warnings") or ():
            key = kind_key(kind)
            known = self.kinds.get(key)
            if known is None:
                known = self.kinds[key] = {**kind, "count": 0, "runs": 0, "variants": []}
                lines.append(f"  warning ({kind['category']} at {kind['where']}, shown once; all kinds are listed "
                             f"in summary.md): {kind['message']}" + (f" [{label}]" if label else ""))
            known["count"] += kind["count"]
            known["runs"] += 1
            if record.get("variant") not in known["variants"]:
                known["variants"].append(record.get("variant"))
        return lines

    def add_all(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            self.add(record)

    def total(self) -> int:
        return sum(kind["count"] for kind in self.kinds.values())

    def markdown(self) -> str:
        """A section of the summary, or ``""`` when no run raised a warning."""
        if not self.kinds:
            return ""
        lines = ["## Warnings raised during the runs", "",
                 f"{self.total()} warnings of {len(self.kinds)} kind(s); each kind (category and the line that "
                 "raised it) is logged once while the ablation runs and counted here.", "",
                 "| warning | raised at | count | runs | variants |", "|---|---|---|---|---|"]
        for kind in self.kinds.values():
            message = kind["message"].replace("|", "\\|")
            lines.append(f"| {kind['category']}: {message} | `{kind['where']}` | {kind['count']} | {kind['runs']} | "
                         f"{', '.join(str(v) for v in kind['variants'])} |")
        return "\n".join(lines)
