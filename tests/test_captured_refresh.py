"""Captured refreshes (``precond.captured_refresh``): ``bases.Refine`` refreshed entry by entry through a CUDA graph
under ``capture=True``, through the same per-entry path eagerly under ``capture="emulate"`` (any device).

What is checked: the per-entry refresh diagonalises a factor as float64 ``eigh`` does and agrees with the batched
refresh to round-off; KL-Shampoo with Refine follows the eager trajectory to round-off under ``"emulate"``; resuming
from a ``state_dict`` gives the bits of the uninterrupted run; bases that are not capturable never take the path; on
CUDA (``-m gpu``) the replayed graphs give the bits of ``"emulate"``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from precond.appliers import Power
from precond.captured_refresh import RefreshGraphs, capturable

from reference import F64, random_orthogonal


def _drifted_factors(batch: int, d: int, seed: int, dtype=torch.float32):
    """``B`` SPD factors with spread eigenvalues and, as the old basis, their eigenbasis turned by a small rotation."""
    gen = torch.Generator().manual_seed(seed)
    factors, olds = [], []
    for _ in range(batch):
        q = random_orthogonal(d, gen)
        values = torch.logspace(0, -3, d, dtype=F64)
        factors.append(q @ torch.diag(values) @ q.T)
        skew = 0.05 * torch.randn(d, d, generator=gen, dtype=F64)
        olds.append(q @ torch.linalg.matrix_exp(skew - skew.T))
    return torch.stack(factors).to(dtype), torch.stack(olds).to(dtype)


def _offdiagonal(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``‖offdiag(QᵀSQ)‖_F / ‖S‖_F`` per entry, in float64."""
    a = basis.double().mT @ factor.double() @ basis.double()
    off = a - torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
    return torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(factor.double())


class _Bucket:
    """Stands for a bucket: the graphs are keyed by its identity."""


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 4), d=st.integers(2, 24), seed=st.integers(0, 2**31 - 1))
def test_the_per_entry_refresh_diagonalises_like_eigh_and_matches_the_batched_one(batch, d, seed) -> None:
    """Three refreshes through ``RefreshGraphs("emulate")`` (the first eager, the rest through the static buffers):
    the basis stays orthonormal, ``QᵀSQ`` is diagonal to float32's level (float64 ``eigh``'s basis gives ~1e-16;
    the drifted start ~1e-1), and each refresh equals the batched ``Refine.refresh`` of the same inputs to
    round-off."""
    factor, basis = _drifted_factors(batch, d, seed)
    refine = bases.Refine(every=1, precision="float32")
    graphs, owner = RefreshGraphs("emulate"), _Bucket()
    for _ in range(3):
        batched = refine.refresh(factor, basis).basis
        basis = graphs.compute(owner, 0, lambda f, b: refine.refresh(f, b), factor, basis).basis
        torch.testing.assert_close(basis, batched, rtol=0, atol=2e-5)
    eye = torch.eye(d, dtype=F64).expand(batch, d, d)
    torch.testing.assert_close(basis.double().mT @ basis.double(), eye, rtol=0, atol=1e-5)
    reference = torch.linalg.eigh(factor.double()).eigenvectors
    assert bool((_offdiagonal(factor, reference) < 1e-12).all())
    assert bool((_offdiagonal(factor, basis) < 1e-4).all()), _offdiagonal(factor, basis)


def test_a_refresh_that_cannot_be_recorded_warns_and_runs_the_same_path_eagerly() -> None:
    """Recording fails (here: no CUDA on this build, or CUDA refuses an operation): a warning, and the refreshes of
    that bucket mode take the per-entry path without a graph, with the bits of ``"emulate"``."""
    factor, basis = _drifted_factors(2, 6, 0)
    refine = bases.Refine(every=1, precision="float32")
    graphs, emulated, owner, other = RefreshGraphs(True), RefreshGraphs("emulate"), _Bucket(), _Bucket()
    run = lambda f, b: refine.refresh(f, b)  # noqa: E731
    if torch.cuda.is_available():
        pytest.skip("CUDA can record this refresh; the fallback needs a failing recording")
    graphs.compute(owner, 0, run, factor, basis)
    emulated.compute(other, 0, run, factor, basis)
    with pytest.warns(RuntimeWarning, match="could not be recorded as a CUDA graph"):
        got = graphs.compute(owner, 0, run, factor, basis).basis
    assert torch.equal(got, emulated.compute(other, 0, run, factor, basis).basis)


def test_only_capturable_bases_take_the_path() -> None:
    assert capturable(bases.Refine()) and not capturable(bases.QRPowerStep()) and not capturable(bases.Eigh())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert RefreshGraphs("emulate").takes(bases.Refine(), cpu)
    assert not RefreshGraphs(True).takes(bases.Refine(), cpu)  # graphs only on CUDA; elsewhere the eager refresh
    assert RefreshGraphs(True).takes(bases.Refine(), cuda)
    assert not RefreshGraphs(True).takes(bases.QRPowerStep(), cuda)
    assert not RefreshGraphs(False).takes(bases.Refine(), cuda)


def _optimizer(params, capture, device="cpu", **options):
    preconditioner = precond.Preconditioner(structures.NMode(), estimators.KL(beta=0.9, track_drift=True),
                                            bases.Refine(every=2), Power(p=0.5, eps=1e-8, eps_placement="outside"))
    return precond.Optimizer(params, preconditioner, lr=3e-2, momentum=0.9, weight_decay=0.01, capture=capture,
                             **options)


def _params(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 9), (6, 9), (6, 9), (5, 2, 3), (7,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def _train(opt, params, steps, start=0):
    """Steps ``start`` to ``steps − 1`` of one fixed sequence of gradients (the earlier ones drawn and dropped)."""
    gen = torch.Generator().manual_seed(1)
    device = params[0].device
    for step in range(steps):
        missing = [step == 7 and i == 1 for i in range(len(params))]  # a partial step splits a bucket
        grads = [None if gone else torch.randn(p.shape, generator=gen) for p, gone in zip(params, missing, strict=True)]
        if step < start:
            continue
        for p, grad in zip(params, grads, strict=True):
            p.grad = None if grad is None else grad.to(device)
        opt.step()
    return [p.detach().cpu().clone() for p in params]


OPTIONS = [{}, {"stagger": True, "async_refresh": True}, {"stagger": True, "drift_tolerance": 0.05,
                                                           "refresh_budget": 2}]


@pytest.mark.parametrize("options", OPTIONS)
def test_emulated_captured_refreshes_follow_the_eager_trajectory(options) -> None:
    """Float32 KL-Shampoo with Refine, 14 steps of refresh period 2: the per-entry refreshes (``"emulate"``) keep the
    parameters of the batched eager ones to float32 round-off (over steps of RMS ~3e-2)."""
    eager_params, emulated_params = _params(), _params()
    eager = _train(_optimizer(eager_params, False, **options), eager_params, 14)
    optimizer = _optimizer(emulated_params, "emulate", **options)
    emulated = _train(optimizer, emulated_params, 14)
    assert any(entry.factor is not None for entry in optimizer.engine.refresh_graphs._graphs.values())
    for a, b in zip(eager, emulated, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS)
def test_a_resumed_run_takes_the_bits_of_the_uninterrupted_one(options) -> None:
    """``state_dict`` after 6 steps, loaded into a new optimizer: the next 8 steps (its first refresh of each mode
    eager, the later ones through the static buffers) give the bits of 14 uninterrupted steps."""
    params = _params()
    whole = _train(_optimizer(params, "emulate", **options), params, 14)
    params = _params()
    first = _optimizer(params, "emulate", **options)
    _train(first, params, 6)
    saved, kept = copy.deepcopy(first.state_dict()), [p.detach().clone() for p in params]
    resumed_params = [torch.nn.Parameter(p) for p in kept]
    resumed = _optimizer(resumed_params, "emulate", **options)
    resumed.load_state_dict(saved)
    for a, b in zip(whole, _train(resumed, resumed_params, 14, start=6), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS)
def test_cuda_graphs_of_the_refreshes_give_the_bits_of_emulate(options) -> None:
    """On CUDA: ``capture=True`` (graphs of the step and of each bucket mode's refresh) against ``"emulate"`` (the
    same kernels launched one by one): the same parameters to the bit, and the refresh graphs were recorded."""
    options = {"tf32": False, **options}
    graph_params, emulated_params = _params("cuda"), _params("cuda")
    captured = _optimizer(graph_params, True, **options)
    with_graphs = _train(captured, graph_params, 14)
    emulated = _train(_optimizer(emulated_params, "emulate", **options), emulated_params, 14)
    assert any(entry.graph is not None for entry in captured.engine.refresh_graphs._graphs.values())
    for a, b in zip(emulated, with_graphs, strict=True):
        assert torch.equal(a, b)
