"""attrs validators shared by the parts' configuration classes (a wrong value names its field)."""

from __future__ import annotations

from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def nonnegative(instance: Any, attribute: Any, value: Any) -> None:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a number ≥ 0, got {value!r}")


def positive(instance: Any, attribute: Any, value: Any) -> None:
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{attribute.name} must be a number > 0, got {value!r}")
