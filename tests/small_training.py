"""Small regression problems the schedule tests train on, the training loop, the resume check and the CUDA
comparison they share (``tests/test_drift.py``, ``test_drift_tracked.py``, ``test_refresh_budget.py``,
``test_fold_every.py``, ``test_basis_power.py``, ``test_preset_refresh.py``)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import pytest
import torch

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def mlp(widths: Sequence[int], seed: int = 0) -> torch.nn.Module:
    """``Linear`` layers of ``widths`` with ``Tanh`` between them, seeded; the last layer has no bias."""
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        last = i == len(widths) - 2
        layers += [torch.nn.Linear(a, b, bias=not last)] + ([] if last else [torch.nn.Tanh()])
    return torch.nn.Sequential(*layers)


def batches(steps: int, inputs: int, outputs: int, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor,
                                                                                                 torch.Tensor]]:
    """``steps`` pairs of standard normal inputs and targets, drawn from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, inputs, generator=g), torch.randn(size, outputs, generator=g)) for _ in range(steps)]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data: Batches) -> None:
    """One optimizer step per batch on the mean squared error."""
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def assert_resume_is_exact(model_of: Callable[[int], torch.nn.Module],
                           optimizer_of: Callable[[torch.nn.Module], Any], data: Batches,
                           cut: int) -> tuple[Any, Any]:
    """Train on ``data`` without a break, and again with a ``state_dict`` round trip after ``cut`` batches into a
    fresh model (another seed) and optimizer; the parameters must agree bit for bit. Returns both optimizers."""
    whole = model_of(0)
    opt_whole = optimizer_of(whole)
    train(whole, opt_whole, data)
    first = model_of(0)
    opt_first = optimizer_of(first)
    train(first, opt_first, data[:cut])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt_first.state_dict())
    resumed = model_of(5)
    resumed.load_state_dict(saved_model)
    opt_resumed = optimizer_of(resumed)
    opt_resumed.load_state_dict(saved_opt)
    train(resumed, opt_resumed, data[cut:])
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    return opt_whole, opt_resumed


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter of ``model``, detached and concatenated."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_on_cuda(model_of: Callable[[], torch.nn.Module], optimizer_of: Callable[..., Any], data: Batches,
                  variants: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, Any]]:
    """For each options mapping of ``variants``: a fresh ``model_of()`` on CUDA and ``optimizer_of(model,
    **options)``, trained on ``data`` moved to CUDA; the final parameters (:func:`flat_parameters`) and the
    optimizer of each. Skips the calling test without CUDA."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    on_device = [(x.cuda(), y.cuda()) for x, y in data]
    runs = []
    for options in variants:
        model = model_of().cuda()
        opt = optimizer_of(model, **options)
        train(model, opt, on_device)
        runs.append((flat_parameters(model), opt))
    return runs
