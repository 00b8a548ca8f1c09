"""``--tensorboard DIR``: each run's losses, learning rate and ``optimizer.stats()`` for TensorBoard.

One ``torch.utils.tensorboard.SummaryWriter`` per run, writing to ``DIR/<variant> lr=<lr> seed=<seed>`` (so
TensorBoard lists the runs by those names): ``lr`` (the first param group's, at every step), ``loss/train`` (the
mean since the previous validation) and ``loss/val`` at every validation, and there too the counters of
``optimizer.stats()`` (our optimizers' numerical fallbacks, ``stats/eigh_jitter`` etc.; a peer without the method
logs none). SummaryWriter needs the ``tensorboard`` package, imported only when asked for; a run reused from
``runs.jsonl`` is not logged again, and the timing pass is not logged.

    python -m precond.ablate --config ablations/demo.toml --tensorboard runs/tb && tensorboard --logdir runs/tb
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

INSTALL = "--tensorboard needs the tensorboard package (torch's SummaryWriter writes with it): pip install tensorboard"


def writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or an ``ImportError`` saying ``pip install tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(INSTALL) from None
    return SummaryWriter


def run_directory(root: Path, variant: str, lr: float, seed: int) -> Path:
    """``root/<variant> lr=<lr> seed=<seed>``, with path separators and control characters in the name replaced."""
    name = re.sub(r"[\\/\x00-\x1f]", "_", f"{variant} lr={lr:g} seed={seed}")
    return Path(root) / name


class RunLog:
    """Scalars of one run to one writer (anything with ``add_scalar(tag, value, step)`` and ``close()``)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __call__(self, step: int, values: dict[str, Any]) -> None:
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()  # SummaryWriter.close flushes


def open_run(root: Optional[Path], variant: str, lr: float, seed: int) -> Optional[Callable[[int, dict], None]]:
    """A :class:`RunLog` into the run's directory under ``root``, or ``None`` without ``--tensorboard``."""
    if root is None:
        return None
    return RunLog(writer_class()(log_dir=str(run_directory(root, variant, lr, seed))))


def optimizer_stats(optimizer: Any) -> dict[str, float]:
    """``optimizer.stats()`` as ``{"stats/<name>": value}`` (numbers only), ``{}`` for an optimizer without it."""
    stats = getattr(optimizer, "stats", None)
    if not callable(stats):
        return {}
    values = stats()
    if not isinstance(values, dict):
        return {}
    return {f"stats/{key}": float(value) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}
