"""Preconditioning inside the backward pass (``overlap_backward=True``) gives exactly the ordinary step's updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import precond

import trajectory_cases


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _train(preset, overlap, steps=8, accumulate=1, **options):
    model = _model()
    opt = getattr(precond, preset)(model.parameters(), lr=1e-2, every=2, on_nonfinite="ignore",
                                   overlap_backward=overlap, state_dtype=torch.float64, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
            loss = model(x).pow(2).sum()
            if micro < accumulate - 1:
                with opt.accumulating():
                    loss.backward()
            else:
                loss.backward()
        opt.step()
        scheduler.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("preset", trajectory_cases.PRESETS)
@pytest.mark.parametrize("options", [{}, {"stagger": True, "async_refresh": True}])
def test_overlapped_step_equals_the_ordinary_step(preset, options):
    ordinary, _ = _train(preset, False, **options)
    overlapped, _ = _train(preset, True, **options)
    assert all(torch.equal(a, b) for a, b in zip(ordinary, overlapped, strict=True))


@pytest.mark.parametrize("preset", ["kl_shampoo", "soap"])
def test_overlap_with_gradient_accumulation(preset):
    ordinary, _ = _train(preset, False, accumulate=3)
    overlapped, _ = _train(preset, True, accumulate=3)
    assert all(torch.equal(a, b) for a, b in zip(ordinary, overlapped, strict=True))


def test_overlap_needs_on_nonfinite_ignore_and_excludes_capture():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        precond.kl_shampoo(_model().parameters(), overlap_backward=True)
    with pytest.raises(ValueError, match="alternatives"):
        precond.kl_shampoo(_model().parameters(), overlap_backward=True, on_nonfinite="ignore", capture=True)


def test_overlap_survives_deepcopy_and_covers_added_groups():
    model = _model()
    opt = precond.kl_shampoo(list(model.parameters())[:4], lr=1e-2, on_nonfinite="ignore", overlap_backward=True)
    opt.add_param_group({"params": list(model.parameters())[4:]})
    copied_model, copied = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (copied_model, copied)):
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            o.zero_grad()
            m(torch.randn(4, 5, generator=gen, dtype=torch.float64)).pow(2).sum().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copied_model.parameters(), strict=True))
    assert copied.overlap_backward


def test_the_work_starts_during_the_backward_and_step_only_moves_the_weights():
    model = _model()
    opt = precond.kl_shampoo(model.parameters(), lr=1e-2, on_nonfinite="ignore", overlap_backward=True)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        opt.zero_grad()
        loss = model(torch.randn(4, 5, generator=gen, dtype=torch.float64)).pow(2).sum()
        momentum = opt.state[model[0].weight].get("momentum")
        before = None if momentum is None else momentum.clone()
        weights = model[0].weight.detach().clone()
        loss.backward()
        if step >= 2:  # state exists and the buckets are indexed: the hooks did the state step already
            assert not torch.equal(before, opt.state[model[0].weight]["momentum"])
            assert torch.equal(weights, model[0].weight)  # ... but the weights wait for step()
        opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["kl_shampoo", "soap", "shampoo"])
def test_overlap_on_cuda_side_streams_equals_the_ordinary_step(preset):
    runs = []
    for overlap in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                              nn.Linear(128, 8)).cuda().double()
        opt = getattr(precond, preset)(model.parameters(), lr=1e-3, every=3, on_nonfinite="ignore", stagger=True,
                                       async_refresh=True, overlap_backward=overlap,
                                       state_dtype=torch.float64)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(32, 64, generator=gen, device="cuda", dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
        runs.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
