"""The captured step (``capture=True``: CUDA graphs per bucket) gives the eager updates to round-off.

On CPU, ``capture="emulate"`` runs exactly the captured body (static buffers, the step count and ``lr`` as device
tensors, bias corrections on the device) without graphs; on CUDA the graphs themselves are replayed (``gpu`` mark).
"""

from __future__ import annotations

import pytest
import torch

import precond

import trajectory_cases

F64 = torch.float64


def _run(preset, capture, device="cpu", dtype=F64, steps=9, **options):
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (4, 5), (3, 2, 4), (6,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in shapes]
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.1}]
    opt = getattr(precond, preset)(groups, lr=1e-2, every=3, capture=capture, state_dtype=dtype, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # lr changes every step
    for step in range(steps):
        for i, p in enumerate(params):
            missing = step == 5 and i == 1  # a partial step splits a bucket: its graph must be rebuilt
            p.grad = None if missing else torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
        opt.step()
        scheduler.step()
    return [p.detach().cpu() for p in params]


@pytest.mark.parametrize("preset", trajectory_cases.PRESETS)
@pytest.mark.parametrize("options", [{}, {"stagger": True, "async_refresh": True}])
def test_emulated_capture_gives_the_eager_updates(preset, options):
    eager, captured = _run(preset, False, **options), _run(preset, "emulate", **options)
    for a, b in zip(eager, captured, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_capture_option_is_validated():
    with pytest.raises(ValueError, match="capture"):
        precond.kl_shampoo([torch.nn.Parameter(torch.zeros(2, 2))], capture="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", trajectory_cases.PRESETS)
@pytest.mark.parametrize("options", [{}, {"stagger": True, "async_refresh": True, "tf32": False}])
def test_cuda_graph_capture_gives_the_eager_updates(preset, options):
    """Graphs replayed on CUDA: float64 to round-off, float32 to float32 noise."""
    for dtype, tolerance in ((F64, 1e-12), (torch.float32, 1e-5)):
        eager = _run(preset, False, "cuda", dtype, **options)
        captured = _run(preset, True, "cuda", dtype, **options)
        for a, b in zip(eager, captured, strict=True):
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)
