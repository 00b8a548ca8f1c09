"""Training tasks with embedded data (nothing to download), for the ablation workbench and the examples.

- ``char_lm`` (:class:`CharLM`): a byte-level causal transformer LM on Python's standard library sources
  (``data=FILE`` for any text file);
- ``teacher_conv`` (:class:`TeacherConv`): a small conv net fit to the labels of a fixed random teacher.

``make_task("char_lm", {"layers": 4, "width": "128"})`` builds one from options given as numbers or strings.
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from precond.tasks.base import Batch, Data, Task
from precond.tasks.char_lm import CharLM
from precond.tasks.gpt import TinyGPT
from precond.tasks.teacher_conv import ConvNet, TeacherConv

TASKS: dict[str, type] = {CharLM.name: CharLM, TeacherConv.name: TeacherConv}

__all__ = ["Batch", "CharLM", "ConvNet", "Data", "TASKS", "Task", "TeacherConv", "TinyGPT", "make_task", "task_options"]


def task_options(name: str) -> dict[str, Any]:
    """The options of task ``name`` with their defaults."""
    return {field.name: field.default for field in attrs.fields(_task_class(name))}


def make_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """Task ``name`` configured by ``options``; strings are converted to the option's type (``"128"`` → 128)."""
    cls = _task_class(name)
    defaults = task_options(name)
    values = {}
    for key, value in (options or {}).items():
        if key not in defaults:
            allowed = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items())
            raise ValueError(f"unknown option {key!r} for task {name!r}; its options are: {allowed}")
        values[key] = _coerce(key, value, defaults[key])
    return cls(**values)


def _task_class(name: str) -> type:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` converted to the type of ``default`` when given as a string (from a command line)."""
    if not isinstance(value, str):
        return float(value) if isinstance(default, float) and isinstance(value, int) else value
    if value.lower() == "none":
        return None
    try:
        if isinstance(default, bool):
            return {"true": True, "false": False}[value.lower()]
        if isinstance(default, int):
            return int(float(value)) if float(value).is_integer() else int(value)
        if isinstance(default, float):
            return float(value)
    except (KeyError, ValueError):
        raise ValueError(f"option {key}={value!r}: expected a {type(default).__name__} like {default!r}") from None
    return value
