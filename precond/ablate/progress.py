"""Progress output: tqdm bars on a terminal (stderr) and plain, flushed log lines on stdout.

tqdm is optional (the ``demo`` extra); without it, or with ``enabled=False``, bars are silent and only the log
lines remain, which is what a batch job's log wants.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - exercised only without the demo extra
    _tqdm = None


class _Silent:
    """Stands in for a tqdm bar when bars are off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int, description: str, enabled: bool, leave: bool = True, position: Optional[int] = None) -> Any:
    """A progress bar of ``total`` steps; on a terminal only (tqdm hides itself when stderr is not a tty)."""
    if not enabled or _tqdm is None:
        return _Silent()
    return _tqdm(total=total, desc=description, leave=leave, position=position, disable=None, dynamic_ncols=True,
                 file=sys.stderr)


def log(message: str) -> None:
    """One line on stdout, flushed at once, printed around any active bar."""
    if _tqdm is not None:
        _tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(message, flush=True)
