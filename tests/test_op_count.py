"""Regression guard on the number of operations a step issues (GitHub issue #11, "fewer, fatter kernels").

Every operation an eager step issues is one dispatch on the host and, on a GPU, one kernel launch, so every extra
small operation (a per-step dtype cast, a tensor re-created from a Python number, one reshape per parameter) costs
host time. That overhead bounded the uncaptured fast step in the first GPU profile (26 ms of host time against 15 ms
of GPU time at max dim 2048); since the op cuts and with ``capture=True`` the measured step is bound by its GPU
work (kernel efficiency, the refreshes' factorisations), not by launches (``docs/benchmarks.md``). The
count is deterministic and needs no GPU: top-level aten operations of ``step()``, counted with the torch profiler by
``precond.bench.op_count``, on a tiny fixed model in ``kl_shampoo_fast_sync``'s configuration (stagger, Cholesky-QR
refreshes, TF32, no finiteness check), averaged over one refresh period.

Before the change that added this test (commit 3565c9a's code) the same measurement gave 190 operations per step
without the refreshes (``steady``) and 329 with them (``total``); after it, 167 and 269.5. The bounds are those
counts plus about 5 %: a change that re-introduces per-step copies or per-parameter operations fails here. A change
that *lowers* the count should lower the bounds too. Two of the devices that lowered it (the gradient mask shared
within a step, one reshape per bucket) are checked for the same results as what they replaced.

A second round (the EMA folds of a bucket in one ``_foreach_lerp_``, spectra kept as broadcast views, the parameter
moves of a step made together, the step counts in one op, no reshape where the view is the shape, λ^½ as one
``_foreach_sqrt``, one-op per-entry norms) took the same measurement from 167 / 269.5 (commit fb1d44b's code) to
116 / 218.5; the bounds are again those plus about 5 %. The new devices are checked bit for bit against what they
replaced below.
"""

import torch

import bases
import precond
from precond.bench.op_count import count_step_ops

SHAPES = [(8, 6), (8, 6), (6,), (4, 3, 2)]  # a stacked bucket of two matrices, a vector, a 3-mode tensor
EVERY = 4
STEADY_BOUND = 122  # 116 measured (167 before the second round)
TOTAL_BOUND = 230  # 218.5 measured (269.5 before the second round)


def test_a_steady_step_issues_no_more_operations_than_measured():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
        optimizer = precond.kl_shampoo([{"params": params, "basis": bases.CholeskyQR(every=EVERY)}], lr=1e-3,
                                       every=EVERY, stagger=True, tf32=True, on_nonfinite="ignore")

        def gradients():
            return [torch.randn(s, generator=gen) for s in SHAPES]

        for _ in range(3 * EVERY + 2):  # past the Householder warm-up refreshes: Cholesky-QR from here on
            for p, g in zip(params, gradients(), strict=True):
                p.grad = g
            optimizer.step()
        count = count_step_ops(optimizer, params, [gradients() for _ in range(EVERY)])  # every stagger phase once
    finally:
        torch.set_num_threads(threads)
    assert count.refresh > 0, "the staggered refreshes were not told apart from the rest of the step"
    assert count.steady <= STEADY_BOUND, f"{count.steady} operations per step without refreshes (bound {STEADY_BOUND})"
    assert count.total <= TOTAL_BOUND, f"{count.total} operations per step with the refreshes (bound {TOTAL_BOUND})"


def test_the_shared_gradient_mask_follows_in_place_changes():
    """The all-zero mask is reused for the same unchanged gradient only: an in-place change is seen at once."""
    from precond.ema import nonzero_gradient

    grad = torch.zeros(3, 4, 5)
    grad[1, 2, 3] = -2.0
    assert nonzero_gradient(grad).tolist() == [False, True, False]
    assert nonzero_gradient(grad).tolist() == [False, True, False]  # the reused mask
    grad[2, 0, 0] = 1e-30
    grad[1].zero_()
    assert nonzero_gradient(grad).tolist() == [False, False, True]
    assert nonzero_gradient(torch.zeros(3, 4, 5)).tolist() == [False, False, False]  # another tensor, same shape


def test_stacking_a_bucket_in_one_reshape_gives_the_per_tensor_views():
    """``Layout.stack``/``unstack`` (one reshape per bucket) equal stacking each ``view`` / ``unview`` of each entry,
    for contiguous and non-contiguous members."""
    import structures

    layout = structures.NMode(max_dim=8).plan((6, 1, 4))
    members = [torch.randn(6, 1, 4), torch.randn(4, 1, 6).transpose(0, 2)]  # the second is not contiguous
    for tensors in (members[:1] * 2, members):
        stacked = layout.stack(tensors)
        assert torch.equal(stacked, torch.stack([layout.view(t) for t in tensors]))
        for back, t in zip(layout.unstack(stacked), tensors, strict=True):
            assert torch.equal(back, t)


def test_folding_many_statistics_in_one_op_gives_each_fold():
    """``fold_all`` (one ``_foreach`` op per update) equals :func:`fold` of each pair, bit for bit, for an EMA and
    for a plain sum, with tensors of several orders sharing one weight vector (an all-zero entry keeps its value)."""
    from precond.ema import fold, fold_all, fold_weights

    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 5, 5), (3, 5), (3, 4, 2, 2), (3, 7)]
    active = torch.tensor([True, False, True])
    for beta in (0.95, 0.5, 1.0):
        weights = fold_weights(beta, active, torch.float32)
        olds = [torch.randn(s, generator=gen) for s in shapes]
        news = [torch.randn(s, generator=gen) for s in shapes]
        original = [o.clone() for o in olds]
        expected = [o.clone() for o in olds]
        for old, new in zip(expected, news, strict=True):
            fold(old, new, beta, weights)
        fold_all(list(zip(olds, news, strict=True)), beta, weights)
        for got, want, before in zip(olds, expected, original, strict=True):
            assert torch.equal(got, want)
            assert torch.equal(got[1], before[1])  # the entry without a gradient is left alone
            assert not torch.equal(got[0], before[0])


def test_kept_broadcast_views_of_the_spectra_follow_the_state():
    """``ParamState.broadcast_spectra`` (views made once per state) shows in-place writes to ``λ_k``, is made again
    when ``λ_k`` is replaced, and scales like the ``(B, d_k)`` spectra it views (reference: explicit broadcasting)."""
    from precond.contractions import scale
    from precond.state import ParamState

    gen = torch.Generator().manual_seed(4)
    lam = [torch.rand(2, 3, generator=gen) + 0.5, None, torch.rand(2, 5, generator=gen) + 0.5]
    ps = ParamState(Q=[None] * 3, S=[None] * 3, lam=lam)
    views = ps.broadcast_spectra()
    assert views[1] is None and views[0].shape == (2, 3, 1, 1) and views[2].shape == (2, 1, 1, 5)
    x = torch.randn(2, 3, 4, 5, generator=gen)
    reference = x * lam[0][:, :, None, None] * lam[2][:, None, None, :]
    assert torch.equal(scale(x, views), reference)
    assert torch.equal(scale(x, views), scale(x, lam))
    lam[0].mul_(2.0)  # in place: the kept view sees it
    assert torch.equal(ps.broadcast_spectra()[0][:, :, 0, 0], lam[0])
    assert ps.broadcast_spectra()[2] is views[2]  # kept
    ps.lam[2] = torch.ones(2, 5)  # replaced: a new view of the new tensor
    assert torch.equal(ps.broadcast_spectra()[2], torch.ones(2, 1, 1, 5))


def test_the_one_op_batch_norm_equals_the_norm_of_each_flattened_entry():
    """``batch_norm`` (one reduction over the non-batch dimensions of a contiguous stack) gives the norm of each
    flattened entry bit for bit, for several orders and sizes, contiguous or not."""
    from precond.appliers._norms import batch_norm

    gen = torch.Generator().manual_seed(5)
    for shape in [(3, 7), (2, 64, 48), (1, 300, 129), (4, 3, 5, 6), (2, 5)]:
        x = torch.randn(shape, generator=gen) * 100.0
        for t in (x, x.transpose(-1, -2)) if len(shape) > 2 else (x, x.T.contiguous().T):
            want = torch.stack([entry.flatten().pow(2).sum().sqrt() for entry in t.double()]).float()
            got = batch_norm(t)
            assert got.shape == (shape[0], *[1] * (len(shape) - 1))
            assert torch.equal(got.flatten(), torch.linalg.vector_norm(t.reshape(shape[0], -1), dim=1))
            assert torch.allclose(got.flatten(), want, rtol=1e-6)


def test_moves_held_back_and_made_together_equal_each_bucket_moved_alone():
    """``PendingMoves`` (one ``_foreach`` op per group for many buckets, flushed at ``limit``) moves every parameter
    exactly as ``move`` of each bucket alone: two groups (decay before / after), a float and a tensor ``lr``, a
    bfloat16 bucket, a reshaped view; reference: ``W ← W − η U`` with decay written out per tensor."""
    import structures
    from precond.moves import PendingMoves, move

    gen = torch.Generator().manual_seed(6)
    g1 = {"lr": 0.1, "weight_decay": 0.01, "decay_order": "before"}
    g2 = {"lr": torch.tensor(0.05), "weight_decay": 0.2, "decay_order": "after"}
    specs = [(g1, (4, 3), torch.float32), (g2, (5,), torch.float32), (g1, (2, 1, 3), torch.bfloat16),
             (g2, (4, 3), torch.float32)]
    buckets = []
    for group, shape, dtype in specs:
        layout = structures.NMode(max_dim=8).plan(shape)
        params = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2)]
        buckets.append((group, params, torch.randn(2, *layout.view_shape, generator=gen), layout))
    for limit in (1, 10, 1 << 22):
        alone = [[p.clone() for p in params] for _, params, _, _ in buckets]
        together = [[p.clone() for p in params] for _, params, _, _ in buckets]
        for (group, _, update, layout), params in zip(buckets, alone, strict=True):
            move(group, [(params, update, layout)])
        pending = PendingMoves(limit=limit)
        for (group, _, update, layout), params in zip(buckets, together, strict=True):
            pending.add(group, params, update, layout)
        pending.flush()
        for (group, originals, update, _), a, b in zip(buckets, alone, together, strict=True):
            lr, wd = group["lr"], group["weight_decay"]
            for p, w, u, got in zip(originals, a, update, b, strict=True):
                step = (u * lr).to(p.dtype).reshape(p.shape)
                want = p * (1 - lr * wd) - step if group["decay_order"] == "before" else (p - step) * (1 - lr * wd)
                assert torch.equal(got, w)
                assert torch.equal(got, want.to(p.dtype))


def test_shared_fold_weights_follow_the_gradient_and_beta():
    """``gradient_weights`` is reused only for the same unchanged gradient, ``β`` and dtype; reference: the weights
    written out, ``1−β`` where an entry has a nonzero value, else 0."""
    from precond.ema import gradient_weights

    grad = torch.zeros(3, 4)
    grad[0, 1] = 2.0
    first = gradient_weights(0.9, grad)
    assert gradient_weights(0.9, grad) is first
    assert torch.equal(first, torch.tensor([1.0 - 0.9, 0.0, 0.0]))
    assert torch.equal(gradient_weights(0.5, grad), torch.tensor([0.5, 0.0, 0.0]))  # another β
    grad[2, 0] = -1.0  # in place: a new mask, new weights
    assert torch.equal(gradient_weights(0.9, grad), torch.tensor([1.0 - 0.9, 0.0, 1.0 - 0.9]))
    want = torch.tensor([1.0 - 0.9, 0.0, 1.0 - 0.9], dtype=torch.float64)
    assert torch.equal(gradient_weights(0.9, grad.double()), want)  # another dtype
