"""The part classes that ``torch.load(..., weights_only=True)`` may rebuild (a leaf module: it imports nothing of the
project, so every package can call it, the kernel included).

``param_groups`` hold the live part objects, and parts of torch's ecosystem pickle them as they are (Lightning's
``BackboneFinetuning`` checkpoints a copy of ``optimizer.param_groups``, and Lightning loads checkpoints with
``weights_only=True``). :func:`allow_library_parts` (run on ``import precond``), :func:`allow_package` (run by each
part package once complete) and :func:`allow_parts` (run for every param group added) put those classes on torch's
list of safe globals. The optimizer's own checkpoints never need them: ``state_dict()`` stores plain descriptions
(``precond.checkpoint``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

import attrs
import torch

PART_PACKAGES = ("structures", "estimators", "bases", "precond.appliers", "precond.preconditioner")
"""What :func:`allow_library_parts` imports by name (the four part packages and the ``Preconditioner``)."""


def _attrs_classes(obj: Any) -> Iterable[type]:
    """Every attrs class in the configuration tree ``obj`` (the object's own class and those of its fields)."""
    if attrs.has(type(obj)):
        yield type(obj)
        for field in attrs.fields(type(obj)):
            yield from _attrs_classes(getattr(obj, field.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _attrs_classes(item)


def allow_parts(obj: Any) -> None:
    """Let ``torch.load(..., weights_only=True)`` rebuild the attrs classes of configuration ``obj`` (a
    ``Preconditioner`` or a part, the library's or your own)."""
    torch.serialization.add_safe_globals(list(set(_attrs_classes(obj))))


def allow_package(package: str) -> None:
    """Put every attrs class defined in the loaded modules of ``package`` on torch's safe globals."""
    classes = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and attrs.has(value) and value.__module__ == name:
                classes.add(value)
    torch.serialization.add_safe_globals(sorted(classes, key=lambda c: (c.__module__, c.__qualname__)))


def allow_library_parts() -> None:
    """Import the part packages and put their attrs classes (and ``Preconditioner``) on torch's safe globals, so
    that ``param_groups`` pickled by another process load with ``weights_only=True`` right after ``import precond``.

    A package that is itself still being imported (``import bases`` before ``import precond``: the package imports
    ``precond.…``, which runs this) is read as far as it has come; ``structures``, ``estimators`` and ``bases`` call
    :func:`allow_package` once they are complete."""
    for package in PART_PACKAGES:
        importlib.import_module(package)
        allow_package(package)
