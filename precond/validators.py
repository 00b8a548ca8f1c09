"""attrs validators for the parts' configuration fields: one factory, each message naming the field's meaning.

A number field refuses booleans, strings, NaN and (unless ``finite=False``) ±inf, as well as values outside its
range, and says what the field means and what it accepts, e.g.
``beta (EMA weight ρ on the old statistic) must be a number in [0, 1], got nan``.

A number is an ``int``, a ``float`` or a NumPy real scalar (``np.float32(1e-3)``, ``np.int64(10)``), as
``torch.optim`` accepts them; a field stores it as the Python number of the same value (:func:`plain_number`, its
converter), so arithmetic, equality and checkpoints (``weights_only`` loads) see plain numbers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np

Validator = Callable[[Any, Any, Any], None]


def is_number(value: Any) -> bool:
    """A real number: ``int``, ``float`` or a NumPy real scalar (``np.float32``, ``np.int64``, …), never a boolean
    (``True``, ``np.True_``) nor an array (a 0-d NumPy array is refused, as ``torch.optim``'s arithmetic does)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An ``int`` or a NumPy integer scalar (``np.int64(10)``), never a boolean."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def plain_number(value: Any) -> Any:
    """A NumPy real scalar as the Python ``int``/``float`` of the same value (``np.float32(0.1)`` becomes
    ``0.10000000149011612``, its exact value); anything else unchanged. The converter of every number field, and
    what ``precond.Optimizer`` does to its groups' numbers."""
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def _range_text(low: Optional[float], high: Optional[float], low_open: bool, high_open: bool, integer: bool) -> str:
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '≥'} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '≤'} {high:g}"
    return kind if integer else "a finite number"


def number(*, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False, optional: bool = False, finite: bool = True,
           also: tuple[Any, ...] = (), meaning: str = "") -> Validator:
    """A validator for a number in ``[low, high]`` (``low_open``/``high_open`` exclude an end).

    ``integer``: only an integer (``int`` or a NumPy integer); ``optional``: ``None`` is accepted too; ``also``:
    further accepted values (e.g. the string ``"dimension"``); ``finite``: refuse ±inf (NaN is always refused);
    ``meaning`` goes in the message. Give the field ``converter=plain_number`` too, so it stores Python numbers.
    """
    allowed = " or ".join([_range_text(low, high, low_open, high_open, integer)]
                          + [repr(a) for a in also] + (["None"] if optional else []))

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if (optional and value is None) or any(value == a and type(value) is type(a) for a in also):
            return
        ok = is_integer(value) if integer else is_number(value)
        if ok:
            ok = not math.isnan(value) and (not finite or math.isfinite(value))
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            label = f"{attribute.name} ({meaning})" if meaning else attribute.name
            raise ValueError(f"{label} must be {allowed}, got {value!r}")

    return check


def one_of(choices: tuple[Any, ...], *, optional: bool = False, meaning: str = "") -> Validator:
    """A validator for one of ``choices`` (``optional``: ``None`` too); the message names the field, what it means
    and every allowed value (``attrs.validators.in_`` puts its attribute's repr into the error instead)."""
    allowed = ", ".join(map(repr, choices)) + (" or None" if optional else "")

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            label = f"{attribute.name} ({meaning})" if meaning else attribute.name
            raise ValueError(f"{label} must be one of {allowed}, got {value!r}")

    return check


nonnegative = number(low=0)
positive = number(low=0, low_open=True)
unit_interval = number(low=0, high=1)
