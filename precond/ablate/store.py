"""The resumable record of finished runs: one JSON object per line in ``runs.jsonl``, keyed by ``key``.

A run is appended (and flushed) as soon as it finishes, so an interrupted ablation loses at most the run in
progress; a line cut short by a crash is skipped with a warning when read back.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterator


class RunStore:
    """Finished runs in a JSON-lines file; ``key in store`` says whether a run is done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self._records[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    warnings.warn(f"{self.path}:{number}: unreadable run record skipped (interrupted write?)",
                                  stacklevel=2)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records.values())

    def get(self, key: str) -> dict[str, Any] | None:
        return self._records.get(key)

    def longest(self, spec: str) -> float | None:
        """The wall time of the longest finished run of the variant ``spec`` (``None`` before the first)."""
        times = [r["wall_seconds"] for r in self._records.values() if r.get("spec") == spec and r.get("wall_seconds")]
        return max(times) if times else None

    def append(self, record: dict[str, Any]) -> None:
        """Store a finished run (a later record with the same key replaces an earlier one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            handle.flush()
        self._records[record["key"]] = record
