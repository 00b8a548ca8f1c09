"""``torch.compile`` of ``precond.Optimizer.step`` is refused with :data:`COMPILE_REFUSAL` (the step is Python control
flow TorchDynamo does not trace): use ``capture=True`` for a faster step, and ``torch.compile(model)`` with an eager
``step()``."""

from __future__ import annotations

from typing import Any

import torch

COMPILE_REFUSAL = (
    "precond.Optimizer.step cannot be compiled with torch.compile: the step runs Python control flow (buckets, "
    "refresh schedules, host-side checks) that TorchDynamo does not trace. For a faster step use capture=True (each "
    "bucket's steady-state update replayed as one CUDA graph, precond.captured). To compile the rest of training, "
    "compile the model (torch.compile(model)) and call optimizer.step() outside the compiled function, or call "
    "torch.compiler.disable(optimizer.step)() inside it")


def refusal() -> bool:
    """Raise :data:`COMPILE_REFUSAL`; called only where :func:`refuse_compilation` found TorchDynamo tracing.

    It raises unconditionally: TorchDynamo runs a function marked constant for real at trace time, and some
    releases (torch 2.11) run it outside the tracing context, where ``torch.compiler.is_compiling()`` is False.
    Marked by ``torch.compiler.assume_constant_result`` (:func:`mark`, when an optimizer is built), so TorchDynamo
    runs it for real while tracing and the error reaches the user as it is: a plain ``raise`` would become a graph
    break (an error of its own with ``fullgraph=True``), then run eagerly, where the check is false. A ``UserError``
    (TorchDynamo's "valid in eager, not supported here", a ``RuntimeError``) is re-raised unchanged, where any other
    exception would be wrapped as an internal error of TorchDynamo's."""
    try:
        from torch._dynamo.exc import UserError, UserErrorType
    except ImportError:  # pragma: no cover - a torch without TorchDynamo's user errors
        raise RuntimeError(COMPILE_REFUSAL) from None
    raise UserError(UserErrorType.ANTI_PATTERN, COMPILE_REFUSAL)


def mark() -> None:
    """Mark :func:`refusal` for TorchDynamo. torch.optim's constructor has imported TorchDynamo by the time an
    optimizer calls this: marking costs nothing then (importing precond does not)."""
    torch.compiler.assume_constant_result(refusal)


def refuse_compilation(*hook_args: Any) -> None:
    """Refuse ``torch.compile`` of ``step()``: the first step pre-hook of every ``precond.Optimizer`` (before any
    other hook, K-FAC's statistics exchange, is traced) and the first line of its ``step``. Eagerly it costs one flag
    check."""
    if torch.compiler.is_compiling():
        refusal()
