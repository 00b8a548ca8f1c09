"""Blocking of modes above ``max_dim`` (``NMode(large="block")``, Meta's Distributed Shampoo).

The numerical tests run a blocked optimizer in float64 and compare it with dense references written here from the
math alone: the gradient is cut with ``torch.split`` (every axis into chunks of ``max_dim``), and each block runs its
own Shampoo / eigenvalue-corrected Shampoo (SOAP's update with ``eigh`` bases) / idealized KL-Shampoo — factor EMA,
``eigh`` roots, Adam graft, momentum, decoupled weight decay — on its own state. Nothing here reads the library's
block plan to build the references.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precond
import structures
from precond.layout import Blocks

F64 = torch.float64


# --- dense references (float64) ----------------------------------------------------------------------------------
def mode_product(x: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    """``x ×_k m``: ``m`` applied to mode ``k`` of ``x``."""
    return torch.movedim(torch.tensordot(m, x, dims=([1], [k])), 0, k)


def unfold(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.movedim(x, k, 0).reshape(x.shape[k], -1)


def gram(x: torch.Tensor, k: int) -> torch.Tensor:
    u = unfold(x, k)
    return u @ u.T


def sum_except(x: torch.Tensor, k: int) -> torch.Tensor:
    return unfold(x, k).sum(dim=1)


def eigh(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(s)
    return values.flip(-1), vectors.flip(-1)


def torch_split_blocks(g: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Meta's multi-dimensional split: ``torch.split`` along every axis in turn (row-major block order)."""
    blocks = [g]
    for axis in range(g.ndim):
        blocks = [piece for b in blocks for piece in torch.split(b, size, dim=axis)]
    return blocks


class Reference:
    """One block, preconditioned as a parameter of its own; the block is viewed without its unit axes. Every mode
    of a block of a weight with two or more axes has a dense factor; a block of a vector has a diagonal one."""

    def __init__(self, shape: tuple[int, ...], vector: bool) -> None:
        self.view = tuple(d for d in shape if d != 1)
        self.kinds = ["diagonal" if vector else "dense" for _ in self.view]
        self.t = 0
        self.calls = 0

    def modes(self):
        return range(len(self.view))

    def rotate(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        for k in self.modes():
            if self.kinds[k] == "dense":
                x = mode_product(x, self.Q[k].T if transpose else self.Q[k], k)
        return x


class ShampooReference(Reference):
    """``S_k ← ρS_k + (1−ρ)Gram_k(G)``, roots from ``eigh`` every T steps (fill at call 1), ``(λ_k+ε)^{-p}`` per
    factor, grafted onto Adam per block, bias-corrected momentum, decay before the update."""

    def __init__(self, shape, vector, beta1, beta2, eps, every, graft_beta=0.999, graft_eps=1e-10, p=0.5):
        super().__init__(shape, vector)
        self.beta1, self.beta2, self.eps, self.every, self.p = beta1, beta2, eps, every, p
        self.graft_beta, self.graft_eps = graft_beta, graft_eps

    def fold(self, g):
        rho = self.beta2
        for k in self.modes():
            if self.kinds[k] == "dense":
                self.S[k] = rho * self.S[k] + (1 - rho) * gram(g, k)
            else:
                self.lam[k] = rho * self.lam[k] + (1 - rho) * sum_except(g * g, k)

    def refresh(self):
        for k in self.modes():
            if self.kinds[k] == "dense":
                values, self.Q[k] = eigh(self.S[k])
                self.lam[k] = values.clamp_min(0)

    def __call__(self, g: torch.Tensor, w: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
        g, shape = g.reshape(self.view), w.shape
        self.calls += 1
        if self.calls == 1:
            n = len(self.view)
            self.S, self.Q, self.lam = [None] * n, [None] * n, [None] * n
            for k in self.modes():
                if self.kinds[k] == "dense":
                    self.S[k] = torch.zeros(self.view[k], self.view[k], dtype=F64)
                else:
                    self.lam[k] = torch.zeros(self.view[k], dtype=F64)
            self.fold(g)
            self.refresh()
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
            return w
        self.t += 1
        t = self.t
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        m_hat = self.m / (1 - self.beta1**t)
        self.v = self.graft_beta * self.v + (1 - self.graft_beta) * g * g
        graft = m_hat / ((self.v / (1 - self.graft_beta**t)).sqrt() + self.graft_eps)
        inner = m_hat
        for k in self.modes():
            root = (self.lam[k] + self.eps).pow(-self.p)
            if self.kinds[k] == "dense":
                inner = mode_product(inner, self.Q[k] @ torch.diag(root) @ self.Q[k].T, k)
            else:
                inner = mode_product(inner, torch.diag(root), k)
        update = inner * (graft.norm() / (inner.norm() + 1e-16))
        self.fold(g)
        if t % self.every == 0:
            self.refresh()
        return w * (1 - lr * wd) - lr * update.reshape(shape)


class EigenvalueCorrectedReference(Reference):
    """SOAP's update with ``eigh`` bases (Meta's eigenvalue-corrected Shampoo): ``R = M ×_k Q_kᵀ``,
    ``V ← ρV + (1−ρ)(G ×_k Q_kᵀ)²`` (bias-corrected, kept across refreshes), ``U = (R/(√V̂ + ε)) ×_k Q_k``; the first
    gradient fills ``S_k`` and is also the first update; bias-corrected momentum, decay before."""

    def __init__(self, shape, vector, beta1, beta2, eps, every):
        super().__init__(shape, vector)
        self.beta1, self.beta2, self.eps, self.every = beta1, beta2, eps, every

    def __call__(self, g, w, lr, wd):
        g, shape = g.reshape(self.view), w.shape
        rho = self.beta2
        self.calls += 1
        if self.calls == 1:
            self.S = {k: (1 - rho) * gram(g, k) for k in self.modes() if self.kinds[k] == "dense"}
            self.Q = {k: eigh(s)[1] for k, s in self.S.items()}
            self.m, self.V = torch.zeros_like(g), torch.zeros_like(g)
        t = self.t = self.t + 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        m_hat = self.m / (1 - self.beta1**t)
        rotated_g = self.rotate(g, transpose=True)
        self.V = rho * self.V + (1 - rho) * rotated_g * rotated_g
        v_hat = self.V / (1 - rho**t)
        update = self.rotate(self.rotate(m_hat, transpose=True) / (v_hat.sqrt() + self.eps), transpose=False)
        if t > 1:  # the fill already holds the first gradient
            for k in self.S:
                self.S[k] = rho * self.S[k] + (1 - rho) * gram(g, k)
            if t % self.every == 0:
                self.Q = {k: eigh(s)[1] for k, s in self.S.items()}
        return w * (1 - lr * wd) - lr * update.reshape(shape)


class IdealizedKLReference(Reference):
    """Idealized KL-Shampoo (Lin et al. 2025, Eq. 4, Fig. 3 left): ``Δ_k = G_(k)(⊗_{j≠k} P_j)G_(k)ᵀ/D_{-k}`` with
    ``P_j = Q_j diag(λ_j)^{-1} Q_jᵀ``, ``S_k ← ρS_k + (1−ρ)Δ_k``, ``Q_k, λ_k = eigh(S_k)`` after every update (a
    diagonal mode: ``λ_k ← ρλ_k + (1−ρ)diag(Δ_k)``), ``λ ≥ max(10, d_k)^{-2}``, ``U = (R/(√(⊗λ) + ε)) ×_k Q_k``,
    heavy-ball momentum, decay after the update."""

    def __init__(self, shape, vector, beta1, beta2, eps):
        super().__init__(shape, vector)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def floor(self, k):
        return max(10, min(self.view[k], 4000)) ** -2.0

    def __call__(self, g, w, lr, wd):
        g, shape = g.reshape(self.view), w.shape
        rho = self.beta2
        self.calls += 1
        complement = [math.prod(self.view) // d for d in self.view]
        if self.calls == 1:
            self.S = {k: (1 - rho) * gram(g, k) / complement[k] for k in self.modes() if self.kinds[k] == "dense"}
            self.Q, self.lam = {}, {}
            for k in self.modes():
                if self.kinds[k] == "dense":
                    values, self.Q[k] = eigh(self.S[k])
                else:
                    values = (1 - rho) * sum_except(g * g, k) / complement[k]
                self.lam[k] = values.clamp_min(self.floor(k))
            self.m = torch.zeros_like(g)
            return w
        self.m = self.beta1 * self.m + (1 - self.beta1) * g
        rotated = self.rotate(self.m, transpose=True)
        spectrum = torch.ones(self.view, dtype=F64)
        for k in self.modes():
            spectrum = spectrum * self.lam[k].reshape([-1 if j == k else 1 for j in self.modes()])
        update = self.rotate(rotated / (spectrum.sqrt() + self.eps), transpose=False)
        inverse = {k: (self.Q[k] @ torch.diag(1 / self.lam[k]) @ self.Q[k].T if self.kinds[k] == "dense"
                       else torch.diag(1 / self.lam[k])) for k in self.modes()}
        deltas = {}
        for k in self.modes():
            z = g
            for j in self.modes():
                if j != k:
                    z = mode_product(z, inverse[j], j)
            deltas[k] = unfold(g, k) @ unfold(z, k).T / complement[k]
        for k, delta in deltas.items():
            if self.kinds[k] == "dense":
                self.S[k] = rho * self.S[k] + (1 - rho) * delta
                values, self.Q[k] = eigh(self.S[k])  # every step; the spectrum is reset to the eigenvalues
            else:
                values = rho * self.lam[k] + (1 - rho) * torch.diagonal(delta)
            self.lam[k] = values.clamp_min(self.floor(k))
        return (w - lr * update.reshape(shape)) * (1 - lr * wd)


def run_reference(make, w0: torch.Tensor, grads, size: int, lr: float, wd: float) -> torch.Tensor:
    """Cut ``w0`` and each gradient with ``torch.split`` and run one reference per block."""
    vector = sum(d != 1 for d in w0.shape) == 1
    w_blocks = [b.clone() for b in torch_split_blocks(w0, size)]
    refs = [make(tuple(b.shape), vector) for b in w_blocks]
    for g in grads:
        w_blocks = [ref(gb, wb, lr, wd)
                    for ref, gb, wb in zip(refs, torch_split_blocks(g, size), w_blocks, strict=True)]
    return w_blocks


# --- the optimizers under test -------------------------------------------------------------------------------------
def _shampoo(params, max_dim, lr, wd, every):
    return precond.Shampoo(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, eps=1e-6, every=every,
                           max_dim=max_dim, large="block", state_dtype=F64)


def _eigenvalue_corrected(params, max_dim, lr, wd, every):
    return precond.EShampoo(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, eps=1e-6, every=every,
                            max_dim=max_dim, large="block", state_dtype=F64)


def _idealized_kl(params, max_dim, lr, wd, every):
    return precond.IdealizedKLShampoo(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, eps=1e-8, max_dim=max_dim,
                                      large="block", state_dtype=F64)


REFERENCES = {
    "shampoo": (_shampoo, lambda every: lambda shape, vector: ShampooReference(shape, vector, 0.9, 0.95, 1e-6, every)),
    "eigenvalue_corrected": (_eigenvalue_corrected, lambda every: lambda shape, vector: EigenvalueCorrectedReference(
        shape, vector, 0.9, 0.95, 1e-6, every)),
    "idealized_kl": (_idealized_kl, lambda every: lambda shape, vector: IdealizedKLReference(
        shape, vector, 0.9, 0.95, 1e-8)),
}


def _run_blocked(make_optimizer, w0, grads, max_dim, lr, wd, every):
    w = torch.nn.Parameter(w0.clone())
    opt = make_optimizer([w], max_dim, lr, wd, every)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w, opt


def _grads(shape, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=F64) for _ in range(n)]


def _assert_blocks_equal(w, expected_blocks, size):
    for got, want in zip(torch_split_blocks(w, size), expected_blocks, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_blocked_matrix_equals_per_block_reference(method):
    """(7, 5) at max_dim 3: blocks 3, 3, 1 × 3, 2 (six blocks, one of them 1×2), five steps across refreshes."""
    make_optimizer, make_reference = REFERENCES[method]
    w0 = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    grads = _grads((7, 5), 6, seed=1)
    w, opt = _run_blocked(make_optimizer, w0, grads, 3, 0.05, 0.1, every=2)
    assert isinstance(opt.layout(w), Blocks) and opt.layout(w).count == 6
    _assert_blocks_equal(w.detach(), run_reference(make_reference(2), w0, grads, 3, 0.05, 0.1), 3)
    assert not torch.equal(w.detach(), w0)


_shapes = st.integers(1, 3).flatmap(lambda n: st.tuples(*[st.integers(2, 7)] * n))


@settings(max_examples=12, deadline=None)
@given(shape=_shapes, max_dim=st.integers(2, 4), method=st.sampled_from(sorted(REFERENCES)),
       seed=st.integers(0, 2**16))
def test_blocked_orders_one_to_three_equal_per_block_reference(shape, max_dim, method, seed):
    make_optimizer, make_reference = REFERENCES[method]
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    grads = _grads(shape, 4, seed=seed + 1)
    w, _ = _run_blocked(make_optimizer, w0, grads, max_dim, 0.05, 0.1, every=2)
    _assert_blocks_equal(w.detach(), run_reference(make_reference(2), w0, grads, max_dim, 0.05, 0.1), max_dim)


@pytest.mark.parametrize("preset", [precond.SOAP, precond.KLShampoo, precond.Shampoo, precond.KLSOAP])
def test_blocked_equals_the_blocks_as_separate_parameters(preset):
    """The presets with their own bases (QR power steps, sorting) too: a blocked weight steps exactly like its blocks
    given to the same optimizer as separate parameters (shapes whose blocks have no unit axis, so each block is
    planned alike either way)."""
    gen = torch.Generator().manual_seed(3)
    shapes, max_dim = [(8, 6), (6, 6, 3), (10,)], 4
    weights = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(7)]
    kw = dict(lr=0.01, weight_decay=0.1, every=3, max_dim=max_dim, state_dtype=F64)
    blocked = [torch.nn.Parameter(w.clone()) for w in weights]
    separate = [torch.nn.Parameter(b.clone()) for w in weights for b in torch_split_blocks(w, max_dim)]
    opt_blocked = preset(blocked, large="block", **kw)
    opt_separate = preset(separate, **kw)
    for step in grads:
        for p, g in zip(blocked, step, strict=True):
            p.grad = g.clone()
        for p, g in zip(separate, (b for whole in step for b in torch_split_blocks(whole, max_dim)), strict=True):
            p.grad = g.clone()
        opt_blocked.step()
        opt_separate.step()
    got = [b for p in blocked for b in torch_split_blocks(p.detach(), max_dim)]
    for a, b in zip(got, separate, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


# --- checkpoints, copies, partial steps ------------------------------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, opt, steps, start=0, skip_bias_at=()):
    losses = []
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(16, 9, generator=gen), torch.randn(16, 3, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if i in skip_bias_at:  # a partial step: the first layer's bias has no gradient
            model[0].bias.grad = None
        opt.step()
        losses.append(loss.item())
    return losses


def _soap(params):
    return precond.SOAP(params, lr=3e-3, every=3, max_dim=4, large="block")


def _shampoo_meta(params):
    return precond.Shampoo(params, lr=1e-2, every=3, max_dim=4, large="block", first_step="update",
                           order="fold_then_apply")


@pytest.mark.parametrize("make", [_soap, _shampoo_meta, lambda params: precond.KLShampoo(
    params, every=3, max_dim=4, large="block")])
def test_state_dict_resumes_bit_for_bit(make):
    model = _model()
    opt = make(model.parameters())
    _train(model, opt, 4, skip_bias_at={2})
    state = opt.state[model[0].weight]
    assert set(state) == {"blocks"} and len(state["blocks"]) == 2 * 3  # 7×9 at 4: (4, 3) × (4, 4, 1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference_losses = _train(model, opt, 6, start=4, skip_bias_at={6})
    reference = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _model(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(checkpoint["opt"])
    assert _train(resumed, opt2, 6, start=4, skip_bias_at={6}) == reference_losses
    for a, b in zip(reference, resumed.parameters(), strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_step_like_the_original(how):
    model = _model()
    opt = _soap(model.parameters())
    _train(model, opt, 4)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert _train(model2, opt2, 4, start=4) == _train(model, opt, 4, start=4)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_parameter_without_gradient_skips_all_its_blocks():
    w, v = torch.nn.Parameter(torch.randn(5, 5)), torch.nn.Parameter(torch.randn(5, 5))
    opt = precond.Shampoo([w, v], lr=0.1, every=2, max_dim=2, large="block", first_step="update")
    for step in range(3):
        w.grad = torch.randn(5, 5)
        v.grad = torch.randn(5, 5) if step != 1 else None
        before = v.detach().clone()
        opt.step()
        if step == 1:
            assert torch.equal(v.detach(), before)
    steps = [int(s["step"]) for s in opt.state[v]["blocks"].values()]
    assert steps == [2] * 9 and all(int(s["step"]) == 3 for s in opt.state[w]["blocks"].values())


def test_replaced_parameter_storage_keeps_stepping():
    """``p.data = …`` (e.g. a dtype round trip): the block views are made again and the steps land in the new
    storage, as an optimizer whose parameter kept its storage."""
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a = precond.SOAP([a], every=2, max_dim=2, large="block")
    opt_b = precond.SOAP([b], every=2, max_dim=2, large="block")
    for i, g in enumerate(grads):
        if i == 2:
            b.data = b.data.clone()
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b) and not torch.equal(a.detach(), w0)


def test_emulated_capture_equals_eager():
    grads = _grads((7, 5), 6, seed=4)
    runs = []
    for capture in (False, "emulate"):
        w = torch.nn.Parameter(torch.ones(7, 5, dtype=F64))
        opt = precond.Shampoo([w], every=2, max_dim=3, large="block", capture=capture, state_dtype=F64)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        runs.append(w.detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-14)


def _blocked_run(device, **options):
    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 5), (9,), (3, 3), (5, 4, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=F64).to(device)) for s in shapes]
    opt = precond.SOAP(params, every=2, max_dim=3, large="block", state_dtype=F64, **options)
    for _ in range(7):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(device)
        opt.step()
    return [p.detach().cpu() for p in params]


_SCHEDULES = [({}, {"capture": True}), ({"stagger": True}, {"stagger": True, "async_refresh": True})]


@pytest.mark.gpu
@pytest.mark.parametrize("plain, options", _SCHEDULES)
def test_cuda_blocked_graphs_and_side_streams_give_the_eager_updates(plain, options):
    for a, b in zip(_blocked_run("cuda", **plain), _blocked_run("cuda", **options), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plain, options", [({}, {"async_refresh": True}), *_SCHEDULES[1:]])
def test_blocked_asynchronous_refreshes_give_the_synchronous_updates(plain, options):
    """Off CUDA an asynchronous refresh is installed a step later too (the same code path): the same updates, bit
    for bit, with and without stagger (block refreshes are scheduled per block)."""
    for a, b in zip(_blocked_run("cpu", **plain), _blocked_run("cpu", **options), strict=True):
        assert torch.equal(a, b)


def test_large_gradient_is_rescaled_per_parameter_not_per_block():
    """The rescale of a huge gradient (``2⁴⁰`` bound) uses one power of two for the whole parameter, so the
    blocks keep their relative scale: the update equals that of the gradient scaled by hand."""
    g = torch.randn(6, 4, dtype=F64)
    g[0, 0] = 2.0**50  # only the first block holds the huge entry
    runs, rescaled = [], []
    for grad in (g, g * 2.0**-10):
        w = torch.nn.Parameter(torch.zeros(6, 4, dtype=F64))
        opt = precond.SOAP([w], every=2, max_dim=2, large="block", first_step="update", state_dtype=F64)
        w.grad = grad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        runs.append(w.detach())
        rescaled.append(opt.stats().get("gradient_rescaled", 0))
    assert rescaled == [1, 0]  # one parameter, counted once
    assert torch.equal(runs[0], runs[1])


# --- the plan ---------------------------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(shape=st.integers(1, 3).flatmap(lambda n: st.tuples(*[st.integers(1, 9)] * n)), max_dim=st.integers(1, 5))
def test_no_block_factor_is_larger_than_max_dim(shape, max_dim):
    """Closed form: axis ``d`` gives ``⌊d/b⌋`` blocks of ``b`` and one of ``d mod b`` (if nonzero); the blocks are
    the product over axes, and no stored factor is larger than ``b × b``."""
    w = torch.nn.Parameter(torch.randn(shape))
    opt = precond.Shampoo([w], every=1, max_dim=max_dim, large="block", first_step="update")
    w.grad = torch.randn(shape)
    opt.step()
    per_axis = [[max_dim] * (d // max_dim) + ([d % max_dim] if d % max_dim else []) for d in shape]
    expected = sorted(tuple(s) for s in itertools.product(*per_axis))
    if any(d > max_dim for d in shape):
        states = list(opt.state[w]["blocks"].values())
        pieces = opt.engine.runtime.members.pieces(w, opt.param_groups[0]["preconditioner"])
        assert sorted(tuple(b.shape) for b in pieces) == expected
        assert len(states) == math.prod(len(a) for a in per_axis)
    else:  # nothing to cut: the weight is planned whole
        assert "blocks" not in opt.state[w]
        states = [opt.state[w]]
    for s in states:
        for factor in (*s["estimator"]["S"].values(), *s["basis"]["Q"].values()):
            assert factor.shape[0] == factor.shape[1] <= max_dim


def test_merging_is_decided_on_the_whole_weight():
    """(2, 3, 9) at max_dim 6 with merge='last': 9 stays alone and is blocked (6, 3); 2·3 = 6 merge, in every block
    (Meta merges, then blocks); a block is never merged again (the 3-long block keeps (6, 3), not (18,))."""
    blocks = structures.NMode(max_dim=6, large="block", merge="last").blocks((2, 3, 9))
    assert [layout.view_shape for layout in blocks.layouts] == [(6, 6), (6, 3)]
    assert blocks.splits == ((2,), (3,), (6, 3))


# --- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_a_fix():
    with pytest.raises(ValueError, match="needs max_dim"):
        structures.NMode(large="block")
    with pytest.raises(ValueError, match="large"):
        structures.NMode(max_dim=4, large="blocks")
    with pytest.raises(ValueError, match="NMode.blocks"):
        structures.NMode(max_dim=4, large="block").plan((9, 3))
    with pytest.raises(ValueError, match="OneSided"):
        precond.OneSidedShampoo([torch.nn.Parameter(torch.randn(9, 3))], max_dim=4, large="block")
    w = torch.nn.Parameter(torch.randn(9, 3))
    with pytest.raises(ValueError, match="overlap_backward"):
        precond.Shampoo([w], max_dim=4, large="block", overlap_backward=True, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="distributed"):
        precond.Shampoo([w], max_dim=4, large="block", distributed=precond.DataParallel())
    small = torch.nn.Parameter(torch.randn(3, 3))
    opt = precond.Shampoo([small], max_dim=4, large="block", overlap_backward=True, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="overlap_backward"):
        opt.add_param_group({"params": [w]})
    assert len(opt.param_groups) == 1


def test_checkpoint_of_other_blocks_is_refused():
    def trained(shapes):
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = precond.Shampoo(params, max_dim=4, large="block", first_step="update")
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return opt

    saved = trained([(9, 3), (3, 3)]).state_dict()
    with pytest.raises(ValueError, match="blocks"):  # a blocked state into a whole parameter, or the reverse
        trained([(3, 3), (9, 3)]).load_state_dict(saved)
    with pytest.raises(ValueError, match="cut into 2 blocks"):
        trained([(6, 3), (3, 3)]).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"\(block 0\) does not fit it: S_1 is \(3, 3\)"):
        trained([(9, 2), (3, 3)]).load_state_dict(saved)


@pytest.mark.parametrize("spectrum", [False, True], ids=["kfac", "ekfac"])
def test_blocking_a_layer_whose_factors_come_from_its_hooks_is_refused(spectrum):
    """K-FAC's A and G come from the whole layer's inputs and output gradients: a block of its weight has none."""
    import bases
    import estimators
    model = torch.nn.Linear(7, 5)
    capture = precond.KFACCapture(model)
    estimator = estimators.KFAC(capture)
    if spectrum:
        estimator = estimators.DenseSpectrum(factors=estimator)
    blocked = precond.Preconditioner(structures.NMode(max_dim=3, large="block"), estimator, bases.Eigh(every=1),
                                     precond.Power(p=0.5 if spectrum else 1.0))
    with pytest.raises(ValueError, match="whole layers.*LayerMatrix"):
        precond.Optimizer([model.weight], lr=0.1, preconditioner=blocked)
