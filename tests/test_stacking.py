"""The fast path (parameters of equal layout stacked into one batch) gives the updates of the simple path
(every parameter on its own), also when some parameters miss gradients and after a checkpoint round trip."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precond

from reference import F64
from strategies import seeds, shapes


@settings(max_examples=15)
@given(shape=shapes(min_order=1, max_order=3, max_numel=60), copies=st.integers(1, 4), seed=seeds,
       preset=st.sampled_from(["kl_shampoo", "soap", "shampoo", "eshampoo", "kl_soap"]),
       skip=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=3),
       schedule=st.sampled_from([{}, {"stagger": True}, {"stagger": True, "async_refresh": True}]))
def test_stacked_updates_equal_per_parameter_updates(shape, copies, seed, preset, skip, schedule):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(shape, generator=gen, dtype=F64) for _ in range(copies)] + [torch.randn(3, dtype=F64)]
    runs = []
    for stack in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(precond, preset)(params, lr=1e-2, every=3, stack=stack, state_dtype=F64, **schedule)
        runs.append((params, opt))
    for step in range(7):
        grads = [torch.randn(t.shape, generator=gen, dtype=F64) for t in init]
        for params, opt in runs:
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                p.grad = None if (step, i) in skip else g.clone()
            opt.step()
        if step == 3:  # checkpoint round trip in the middle: buckets are rebuilt from per-parameter tensors
            params, opt = runs[0]
            fresh = getattr(precond, preset)(params, lr=1e-2, every=3, stack=True, state_dtype=F64, **schedule)
            fresh.load_state_dict(opt.state_dict())
            runs[0] = (params, fresh)
    for a, b in zip(runs[0][0], runs[1][0], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def test_stacked_state_is_shared_with_per_parameter_views():
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    opt = precond.kl_shampoo(params, lr=1e-2, every=2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    buckets = opt.buckets()
    assert len(buckets) == 1 and len(buckets[0].params) == 3
    stacked = buckets[0].state.S[0]
    for i, p in enumerate(params):
        view = opt.state[p]["estimator"]["S"]["0"]
        assert view.data_ptr() == stacked[i].data_ptr()
