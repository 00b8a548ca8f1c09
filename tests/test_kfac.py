"""K-FAC and EKFAC (issue 12): the factors, the damped step and the eigenvalue-corrected spectrum against dense
float64 references built here from autograd (per-example gradients, ``torch.func`` Jacobians), and against
curvlinops' ``KFACLinearOperator``/``EKFACLinearOperator`` where that test-only package is installed.

Vectorisation: a weight ``W (out, fan_in)`` is flattened row-major, so K-FAC's block is ``S_G ⊗ S_A``
(``torch.kron(G, A)``) and ``vec(g aᵀ) = g ⊗ a``; a bias's block is ``S_G``.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bases
import estimators
import precond
import structures
from precond.kfac_capture import KFACCapture

from reference import F64
from strategies import seeds, shapes

# --- dense helpers ---------------------------------------------------------------------------------------------


def _factors(opt: precond.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """``[S_G]`` or ``[S_G, S_A]`` of ``p`` from the optimizer's state."""
    S = opt.state[p]["estimator"]["S"]
    return [S[str(k)] for k in range(len(S))]


def _kfac_block(opt: precond.Optimizer, p: torch.Tensor) -> torch.Tensor:
    factors = _factors(opt, p)
    return factors[0] if len(factors) == 1 else torch.kron(factors[0], factors[1])


def _basis(opt: precond.Optimizer, p: torch.Tensor) -> torch.Tensor:
    Q = opt.state[p]["basis"]["Q"]
    return Q["0"] if len(Q) == 1 else torch.kron(Q["0"], Q["1"])


def _ekfac_block(opt: precond.Optimizer, p: torch.Tensor) -> torch.Tensor:
    q = _basis(opt, p)
    return q @ torch.diag(opt.state[p]["estimator"]["V"].reshape(-1)) @ q.T


def _diagonal_blocks(matrix: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(matrix[start:start + p.numel(), start:start + p.numel()])
        start += p.numel()
    return out


def _flat_grads(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _per_example_fisher(model: nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · Σ_n ∇ℓ_n ∇ℓ_nᵀ`` from one autograd call per example (``ℓ_n`` the unreduced loss of example n)."""
    params = list(model.parameters())
    grads = torch.stack([_flat_grads(loss_fn(model(X[n:n + 1]), y[n:n + 1]), params) for n in range(X.shape[0])])
    return scale * grads.T @ grads


def _kfac(model: nn.Module, **kw) -> precond.Optimizer:
    kw = {"lr": 0.0, "beta": 0.0, "every": 1, "momentum": 0.0, "state_dtype": F64, **kw}
    return precond.kfac(model, **kw)


def _ekfac(model: nn.Module, **kw) -> precond.Optimizer:
    kw = {"lr": 0.0, "beta": 0.0, "every": 1, "momentum": 0.0, "state_dtype": F64, **kw}
    return precond.ekfac(model, **kw)


def _mlp(widths: list[int], bias: bool, gen: torch.Generator, activation=nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2 and activation is not None:
            layers.append(activation())
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def _cnn(gen: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2), nn.Flatten(),
                          nn.Linear(8, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * 0.5)
    return model


# --- structure -------------------------------------------------------------------------------------------------


@given(shape=shapes(min_order=1, max_order=4, max_dim=4), max_dim=st.one_of(st.none(), st.integers(1, 6)))
def test_layer_matrix_views_out_by_fan_in_and_keeps_unit_modes(shape, max_dim):
    layout = structures.LayerMatrix(max_dim=max_dim).plan(shape)
    x = torch.randn(shape, dtype=F64)
    expected = x.reshape(shape[0], -1) if len(shape) > 1 else x
    assert torch.equal(layout.view(x), expected)
    assert torch.equal(layout.unview(layout.view(x)), x)
    assert layout.kinds == tuple("dense" if max_dim is None or d <= max_dim else "diagonal" for d in expected.shape)


# --- Must show 1: one datum, β = 0, every = 1 → the dense damped solve --------------------------------------------


@settings(max_examples=12)
@given(widths=st.lists(st.integers(1, 4), min_size=2, max_size=4), bias=st.booleans(), seed=seeds,
       preset=st.sampled_from(["kfac", "ekfac"]), reduction=st.sampled_from(["mean", "sum"]))
def test_one_datum_step_is_the_damped_dense_solve(widths, bias, seed, preset, reduction):
    gen = torch.Generator().manual_seed(seed)
    model = _mlp(widths, bias, gen)
    x = torch.randn(1, widths[0], generator=gen, dtype=F64)
    target = torch.randn(1, widths[-1], generator=gen, dtype=F64)
    lr, damping = 0.3, 0.05
    opt = (_kfac if preset == "kfac" else _ekfac)(model, lr=lr, damping=damping, reduction=reduction)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    loss = ((model(x) - target) ** 2).sum()
    loss.backward()
    grads = [p.grad.detach().reshape(-1).clone() for p in params]
    opt.step()
    for p, w0, g in zip(params, before, grads, strict=True):
        fisher = torch.outer(g, g)  # the empirical Fisher of one datum, exactly A⊗G
        expected = -lr * torch.linalg.solve(fisher + damping * torch.eye(g.numel(), dtype=F64), g)
        torch.testing.assert_close((p.detach() - w0).reshape(-1), expected, rtol=1e-9, atol=1e-12)


# --- Must show 2: deep linear network + MSE → the exact block-diagonal GGN ----------------------------------------


def _exact_ggn(model: nn.Module, X: torch.Tensor, hessian_scale: float) -> torch.Tensor:
    """``Σ_n J_nᵀ (hessian_scale·I) J_n`` with ``J_n = ∂f(x_n)/∂θ`` from ``torch.func.jacrev``."""
    names = [name for name, _ in model.named_parameters()]
    values = tuple(p.detach() for p in model.parameters())

    def outputs(*flat):
        return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (X,))

    jac = torch.func.jacrev(outputs, argnums=tuple(range(len(values))))(*values)
    J = torch.cat([j.reshape(X.shape[0] * j.shape[1], -1) for j in jac], dim=1)
    return hessian_scale * J.T @ J


def _type2_kfac(widths: list[int], reduction: str):
    """precond.kfac's factors (β = 0, one step) of a deep linear network whose ``G`` comes from type-2 backward
    passes: the columns of the MSE Hessian's square root (``√2·I``), carrying the reduction's ``1/m`` as a gradient
    of the reduced loss does; the training loss's own backward runs with the capture paused."""
    gen = torch.Generator().manual_seed(len(widths) * 10 + widths[0])
    model = _mlp(widths, bias=True, gen=gen, activation=None)
    N, C = 7, widths[-1]
    X = torch.randn(N, widths[0], generator=gen, dtype=F64)
    y = torch.randn(N, C, generator=gen, dtype=F64)
    loss_fn = nn.MSELoss(reduction=reduction)
    m = 1.0 if reduction == "sum" else float(N * C)  # MSELoss(mean) averages over all N·C entries
    opt = _kfac(model, reduction=reduction, loss_terms=N * C)
    params = list(model.parameters())
    out = model(X)
    for c in range(C):
        column = torch.zeros(N, C, dtype=F64)
        column[:, c] = 2.0**0.5 / m
        torch.autograd.grad((out * column).sum(), params, retain_graph=True)
    with opt.kfac_capture.paused():
        loss_fn(out, y).backward()
    opt.step()
    return model, X, y, loss_fn, m, opt


DEEP_LINEAR = [[6, 3, 1], [5, 4, 3], [4, 3, 3, 2]]


@pytest.mark.parametrize("widths", DEEP_LINEAR)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_deep_linear_mse_type2_factors_are_the_exact_ggn_blocks(widths, reduction):
    model, X, _, _, m, opt = _type2_kfac(widths, reduction)
    params = list(model.parameters())
    ggn = _exact_ggn(model, X, 2.0 / m)
    for p, block in zip(params, _diagonal_blocks(ggn, params), strict=True):
        torch.testing.assert_close(_kfac_block(opt, p), block, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("widths", DEEP_LINEAR)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_deep_linear_mse_type2_factors_match_curvlinops(widths, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    model, X, y, loss_fn, _, opt = _type2_kfac(widths, reduction)
    opt.kfac_capture.remove()
    params = list(model.parameters())
    theirs = curvlinops.KFACLinearOperator(model, loss_fn, params, [(X, y)], fisher_type="type-2",
                                           check_deterministic=False)
    dense = theirs @ torch.eye(sum(p.numel() for p in params), dtype=F64)
    for p, block in zip(params, _diagonal_blocks(dense, params), strict=True):
        torch.testing.assert_close(_kfac_block(opt, p), block, rtol=1e-10, atol=1e-12)


# --- empirical factors of Linear and Conv2d layers: curvlinops -----------------------------------------------------


@pytest.mark.parametrize("net", ["mlp", "cnn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_factors_and_ekfac_match_curvlinops(net, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    gen = torch.Generator().manual_seed(3)
    if net == "mlp":
        model, X = _mlp([5, 6, 4], True, gen), torch.randn(9, 5, generator=gen, dtype=F64)
    else:
        model, X = _cnn(gen), torch.randn(6, 2, 5, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 4, (X.shape[0],), generator=gen)
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    params = list(model.parameters())
    eye = torch.eye(sum(p.numel() for p in params), dtype=F64)
    for maker, operator, block_of in ((_kfac, curvlinops.KFACLinearOperator, _kfac_block),
                                      (_ekfac, curvlinops.EKFACLinearOperator, _ekfac_block)):
        opt = maker(model, reduction=reduction)
        loss_fn(model(X), y).backward()
        opt.step()
        opt.zero_grad()
        opt.kfac_capture.remove()
        dense = operator(model, loss_fn, params, [(X, y)], fisher_type="empirical", check_deterministic=False) @ eye
        for p, block in zip(params, _diagonal_blocks(dense, params), strict=True):
            torch.testing.assert_close(block_of(opt, p), block, rtol=1e-8, atol=1e-10)


# --- Must show 3: EKFAC's spectrum is diag(Qᵀ F Q), closer to F than K-FAC ------------------------------------------


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_ekfac_spectrum_is_the_per_example_fisher_in_the_kronecker_basis(net):
    gen = torch.Generator().manual_seed(11)
    if net == "mlp":
        model, X = _mlp([4, 5, 3], True, gen), torch.randn(12, 4, generator=gen, dtype=F64)
    else:
        model, X = _cnn(gen), torch.randn(10, 2, 5, 5, generator=gen, dtype=F64)
    y = torch.randint(0, model(X[:1]).shape[1], (X.shape[0],), generator=gen)
    params = list(model.parameters())
    fisher = _per_example_fisher(model, nn.CrossEntropyLoss(reduction="sum"), X, y, scale=1.0 / X.shape[0])
    opt = _ekfac(model)
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    for p, block in zip(params, _diagonal_blocks(fisher, params), strict=True):
        q = _basis(opt, p)
        v = opt.state[p]["estimator"]["V"].reshape(-1)
        torch.testing.assert_close(v, torch.diagonal(q.T @ block @ q), rtol=1e-9, atol=1e-12)
        ekfac_error = torch.linalg.matrix_norm(_ekfac_block(opt, p) - block)
        kfac_error = torch.linalg.matrix_norm(_kfac_block(opt, p) - block)
        assert ekfac_error <= kfac_error + 1e-12 * torch.linalg.matrix_norm(block)
        if p.ndim > 1:  # a bias's K-FAC block is exact (S_G is its Fisher), so only weights must improve strictly
            assert ekfac_error < kfac_error


def test_ekfac_batch_moment_is_the_scaled_square_of_the_rotated_gradient():
    gen = torch.Generator().manual_seed(5)
    model, X = _mlp([3, 4, 2], True, gen), torch.randn(6, 3, generator=gen, dtype=F64)
    y = torch.randint(0, 2, (6,), generator=gen)
    opt = _ekfac(model, moment="batch")
    nn.functional.cross_entropy(model(X), y).backward()
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    opt.step()
    for p, g in grads.items():
        rotated = _basis(opt, p).T @ g.reshape(-1)
        torch.testing.assert_close(opt.state[p]["estimator"]["V"].reshape(-1), 6.0 * rotated**2, rtol=1e-10, atol=1e-14)


# --- several steps: EMA from the identity, factor and eigendecomposition frequencies -------------------------------


def test_steps_follow_a_dense_reference_kfac():
    """precond.kfac against K-FAC written densely here: ``S ← βS + (1−β)X_t`` from ``S = I`` on the steps
    ``t ≡ 1 (mod factor_every)``, the damped inverse ``(S_G ⊗ S_A + λI)⁻¹`` (or ``(S_G + λI)⁻¹``) taken at step 1 and
    after the fold of every step ``t ≡ 0 (mod every)``, and applied to the next gradients."""
    gen = torch.Generator().manual_seed(2)
    model = _mlp([3, 4, 2], True, gen)
    beta, lr, damping, every, factor_every = 0.6, 0.2, 0.1, 2, 3
    opt = precond.kfac(model, lr=lr, damping=damping, beta=beta, every=every, factor_every=factor_every,
                       momentum=0.0, state_dtype=F64)
    reference = [p.detach().clone() for p in model.parameters()]
    factors = [[torch.eye(4, dtype=F64), torch.eye(3, dtype=F64)], [torch.eye(4, dtype=F64)],
               [torch.eye(2, dtype=F64), torch.eye(4, dtype=F64)], [torch.eye(2, dtype=F64)]]
    inverses: list[torch.Tensor] = []
    for t in range(1, 9):
        x = torch.randn(5, 3, generator=gen, dtype=F64)
        y = torch.randint(0, 2, (5,), generator=gen)
        # reference forward with the layers' inputs and output gradients made explicit
        w1, b1, w2, b2 = [r.clone().requires_grad_() for r in reference]
        h1 = x @ w1.T + b1
        z1 = torch.tanh(h1)
        out = z1 @ w2.T + b2
        h1.retain_grad()
        out.retain_grad()
        nn.functional.cross_entropy(out, y).backward()
        if (t - 1) % factor_every == 0:
            A1, G1 = x.T @ x / 5, 5 * h1.grad.T @ h1.grad
            A2, G2 = z1.detach().T @ z1.detach() / 5, 5 * out.grad.T @ out.grad
            for factor, new in zip(factors, [[G1, A1], [G1], [G2, A2], [G2]], strict=True):
                for i, n in enumerate(new):
                    factor[i] = beta * factor[i] + (1 - beta) * n
        if t == 1 or t % every == 0:
            new_inverses = []
            for f in factors:
                k = f[0] if len(f) == 1 else torch.kron(f[0], f[1])
                new_inverses.append(torch.linalg.inv(k + damping * torch.eye(k.shape[0], dtype=F64)))
        if t == 1:
            inverses = new_inverses
        grads = [w1.grad, b1.grad, w2.grad, b2.grad]
        reference = [r - lr * (inv @ g.reshape(-1)).reshape(r.shape)
                     for r, inv, g in zip(reference, inverses, grads, strict=True)]
        if t > 1 and t % every == 0:
            inverses = new_inverses  # installed after the step's update, used from the next step on
        # the library
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for p, r in zip(model.parameters(), reference, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-9, atol=1e-11)


# --- the capture ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [
    {"kernel_size": 3, "padding": 1}, {"kernel_size": 2, "stride": 2},
    {"kernel_size": 3, "padding": "same", "dilation": 2},
    {"kernel_size": (2, 3), "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 1}, {"kernel_size": 4, "padding": 0},
])
def test_conv_patches_rebuild_the_weight_gradient(conv):
    """With one example, ``Σ_l g_l a_lᵀ`` over the unfolded patches is the weight gradient autograd computes, so the
    capture's per-example moment with ``Q = I`` is ``∇W²`` (and ``(Σ_l g_l)²`` for the bias)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(2, 3, **conv).double()
    capture = KFACCapture(layer)
    x = torch.randn(1, 2, 6, 7, generator=gen, dtype=F64)
    (layer(x) ** 2).sum().backward()
    for p in (layer.weight, layer.bias):
        moment = capture.rotated_moment(p, [None, None], dtype=F64)
        torch.testing.assert_close(moment, p.grad.reshape(moment.shape) ** 2, rtol=1e-10, atol=1e-12)


def test_linear_on_sequences_uses_every_row_and_loss_terms():
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 5, 3, generator=gen, dtype=F64)
    for loss_terms, m in (("batch", 4), ("rows", 20), (7, 7)):
        capture = KFACCapture(layer, loss_terms=loss_terms)
        out = layer(x)
        out.retain_grad()
        out.square().mean().backward()
        a, g = x.reshape(-1, 3), out.grad.reshape(-1, 2)
        torch.testing.assert_close(capture.factor(layer.weight, "input", dtype=F64), a.T @ a / 20)
        torch.testing.assert_close(capture.factor(layer.weight, "output", dtype=F64), m * g.T @ g)
        torch.testing.assert_close(capture.factor(layer.bias, "output", diagonal=True, dtype=F64), m * (g * g).sum(0))
        capture.remove()
        layer.zero_grad()


def test_capture_records_only_forwards_that_receive_a_gradient():
    layer = nn.Linear(3, 2).double()
    capture = KFACCapture(layer)
    x = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        layer(x)
    layer(x)  # a forward under grad whose output never gets a gradient
    with capture.paused():
        layer(x).sum().backward()
    assert not capture.has_statistics(layer.weight)
    out = layer(x)
    with capture.paused():
        out.sum().backward(retain_graph=True)  # gradients of a recorded forward, but paused
    assert not capture.has_statistics(layer.weight)
    out.sum().backward()
    assert capture.has_statistics(layer.weight)
    capture.advance()
    assert not capture.has_statistics(layer.weight)


def test_factor_every_records_on_due_steps_only():
    layer = nn.Linear(3, 2).double()
    opt = _kfac(layer, factor_every=3, beta=0.5)
    x = torch.randn(4, 3, dtype=F64)
    seen = []
    for _ in range(7):
        opt.zero_grad()
        layer(x).sum().backward()
        seen.append(opt.kfac_capture.has_statistics(layer.weight))
        opt.step()
    assert seen == [True, False, False, True, False, False, True]


def test_unsupported_and_tied_layers_go_to_the_adam_part():
    head = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 4), head, nn.LayerNorm(4))
    model.add_module("tied", nn.Linear(4, 4, bias=False))
    model.tied.weight = head.weight
    opt = precond.kfac(model)
    skipped = opt.kfac_capture.skipped
    assert set(skipped) == {"0", "3", "tied"}
    assert "groups=2" in skipped["0"] and "shared" in skipped["3"]
    kfac_group, adam_group = opt.param_groups
    assert [id(p) for p in kfac_group["params"]] == [id(model[2].weight), id(model[2].bias)]
    assert isinstance(adam_group["preconditioner"].structure, structures.Diagonal)
    assert len(adam_group["params"]) == 5  # grouped conv weight and bias, the tied weight, the norm's two


def test_checkpoint_holds_plain_data_and_resumes_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(6, 2, 5, 5, generator=gen, dtype=F64), torch.randint(0, 4, (6,), generator=gen))
            for _ in range(5)]

    def train(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model = _cnn(torch.Generator().manual_seed(9))
    opt = precond.ekfac(model, lr=0.05, every=2, factor_every=2, state_dtype=F64)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    saved = opt.state_dict()["param_groups"][0]["preconditioner"]["estimator"]["factors"]["capture"]
    assert saved == {"class": "KFACCapture", "reduction": "mean", "loss_terms": "batch", "factor_every": 2}
    train(model, opt, data[3:])

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed = _cnn(torch.Generator().manual_seed(0))
    resumed.load_state_dict(checkpoint["model"])
    opt2 = precond.ekfac(resumed, lr=0.05, every=2, factor_every=2, state_dtype=F64)
    opt2.load_state_dict(checkpoint["opt"])  # also the capture's step count: factors are recorded on the same steps
    assert opt2.kfac_capture.steps == 3
    train(resumed, opt2, data[3:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


# --- DenseSpectrum(transport="reset") on any factors -----------------------------------------------------------


def test_dense_spectrum_reset_restarts_v_at_the_kronecker_eigenvalues():
    gen = torch.Generator().manual_seed(8)
    beta = 0.7
    pre = precond.Preconditioner(
        structure=structures.NMode(),
        estimator=estimators.DenseSpectrum(estimators.Shampoo(beta=beta), beta=beta, bias_correction=False,
                                           transport="reset"),
        basis=bases.Eigh(every=3), applier=precond.Power(p=0.5))
    layout = pre.plan((3, 4))

    def kron_eigenvalues(ps):
        values = [torch.linalg.eigvalsh(ps.S[k][0]).flip(0) for k in range(2)]
        return torch.outer(values[0], values[1])

    grad = torch.randn(1, 3, 4, generator=gen, dtype=F64)
    ps = pre.init_state(grad, layout)
    torch.testing.assert_close(ps.estimator["V"][0], kron_eigenvalues(ps))
    for t in range(1, 7):
        grad = torch.randn(1, 3, 4, generator=gen, dtype=F64)
        v_before = ps.estimator["V"].clone()
        rotated = ps.Q[0][0].T @ grad[0] @ ps.Q[1][0]
        pre.step(ps, grad, grad, layout, t)
        if t % 3 == 0:
            torch.testing.assert_close(ps.estimator["V"][0], kron_eigenvalues(ps))
        else:
            torch.testing.assert_close(ps.estimator["V"][0], beta * v_before[0] + (1 - beta) * rotated**2)


def _staggered_ekfac(stack: bool) -> tuple[list[torch.Tensor], int]:
    """Six steps of a staggered EKFAC on two ``Linear(4, 5)`` (their weights one bucket with ``stack``), checking
    after each that every refreshed weight has ``V = λ_G ⊗ λ_A``; the parameters, and the number of steps that
    refreshed the two weights differently (a part of the bucket)."""
    torch.manual_seed(5)
    model = nn.ModuleDict({"a": nn.Linear(4, 5), "b": nn.Linear(4, 5)}).double()
    opt = precond.ekfac(model, lr=0.05, every=2, stagger=True, stack=stack, state_dtype=F64)
    weights = [model["a"].weight, model["b"].weight]
    gen = torch.Generator().manual_seed(6)
    partial = 0
    for _ in range(6):
        x = torch.randn(8, 4, generator=gen, dtype=F64)
        opt.zero_grad()
        (model["a"](x).tanh().square().sum() + model["b"](x).sin().sum()).backward()
        before = [dict(opt.state[w]["basis"]["Q"]) if opt.state else None for w in weights]
        before = [None if b is None else {k: q.clone() for k, q in b.items()} for b in before]
        opt.step()
        if before[0] is None:
            continue
        refreshed = [sorted(k for k, q in opt.state[w]["basis"]["Q"].items() if not torch.equal(q, old[k]))
                     for w, old in zip(weights, before, strict=True)]
        partial += refreshed[0] != refreshed[1]
        for w, modes in zip(weights, refreshed, strict=True):
            if modes:
                lam = opt.state[w]["estimator"]["lambda"]
                assert torch.equal(opt.state[w]["estimator"]["V"], torch.outer(lam["0"], lam["1"])), modes
    if stack:
        assert any(len(bucket.params) == 2 for bucket in opt.buckets()), "the two weights share a bucket"
    opt.kfac_capture.remove()
    return [p.detach().clone() for p in model.parameters()], partial


def test_staggered_ekfac_resets_v_from_the_spectrum_of_every_mode():
    """EKFAC's ``V`` restarts at ``λ_G ⊗ λ_A`` at every eigendecomposition; with ``stagger``, a refresh of mode
    ``k`` of a part of a stacked bucket resets ``V`` from the current ``λ`` of every mode, as a refresh of a whole
    bucket (``stack=False``: a bucket of its own) does, so both train alike. (It reset ``V`` from ``λ_k`` alone:
    the partial refresh was handed mode ``k`` of the state only.)"""
    stacked, partial = _staggered_ekfac(stack=True)
    assert partial, "the two weights must refresh at different steps for this test to mean something"
    single, _ = _staggered_ekfac(stack=False)
    for a, b in zip(stacked, single, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


# --- copies and refused steps -----------------------------------------------------------------------------------


def _lifecycle_model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).double()


def _lifecycle_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(torch.randn(6, 4, generator=gen, dtype=F64), torch.randn(6, 3, generator=gen, dtype=F64))
            for _ in range(n)]


def _train(model: nn.Module, opt: precond.Optimizer, batches) -> None:
    for x, y in batches:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _uninterrupted(preset: str, batches, options) -> list[torch.Tensor]:
    """The parameters after training a fresh lifecycle model on every batch without interruption."""
    model = _lifecycle_model()
    opt = getattr(precond, preset)(model, **options)
    _train(model, opt, batches)
    opt.kfac_capture.remove()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("preset", ["kfac", "ekfac"])
def test_a_copy_of_model_and_optimizer_steps_exactly_like_the_original(preset, how):
    """``copy.deepcopy((model, optimizer))`` and pickling them together give a pair whose capture hooks the copied
    modules, keyed to the copied parameters and attached to the copied optimizer: both pairs go on bitwise like an
    uninterrupted run. (The capture was keyed by ``id(p)`` of the original parameters — ``KeyError`` on the copy's
    first step — and its hooks were closures that pickle refused.)"""
    batches = _lifecycle_batches(6)
    options = dict(lr=0.05, every=2, factor_every=2, state_dtype=F64)
    expected = _uninterrupted(preset, batches, options)

    model = _lifecycle_model()
    opt = getattr(precond, preset)(model, **options)
    _train(model, opt, batches[:3])
    copier = copy.deepcopy if how == "deepcopy" else (lambda pair: pickle.loads(pickle.dumps(pair)))
    twin_model, twin = copier((model, opt))
    capture = twin.kfac_capture
    assert capture is not opt.kfac_capture and capture.steps == opt.kfac_capture.steps == 3
    estimator = twin.param_groups[0]["preconditioner"].estimator
    assert capture is getattr(estimator, "factors", estimator).capture
    assert [id(p) for p in capture.params] == [id(p) for p in twin.param_groups[0]["params"]]
    assert all(twin_model[i]._forward_hooks for i in (0, 3))
    for m, o in ((twin_model, twin), (model, opt)):
        _train(m, o, batches[3:])
        for p, e in zip(m.parameters(), expected, strict=True):
            assert torch.equal(p.detach(), e)
        o.kfac_capture.remove()
    assert not any(m._forward_hooks for m in twin_model.modules())


def _poisoned_step(model: nn.Sequential, opt: precond.Optimizer, batch) -> None:
    """Forward and backward of ``batch``, a NaN in one gradient, and ``opt.step()``."""
    x, y = batch
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()


@pytest.mark.parametrize("preset", ["kfac", "ekfac"])
def test_a_refused_step_keeps_no_records_and_the_redone_step_is_the_uninterrupted_one(preset):
    """``on_nonfinite="raise"``: a NaN gradient is refused with every tensor of the model and the optimizer as it
    was, and the capture keeps nothing of the refused step (nor counts it): the step redone with a new forward and
    backward is the uninterrupted run's, bitwise. (The refused step's records were kept, so the redone step folded
    them twice.)"""
    batches = _lifecycle_batches(5)
    options = dict(lr=0.05, every=2, factor_every=2, state_dtype=F64)
    expected = _uninterrupted(preset, batches, options)

    model = _lifecycle_model()
    opt = getattr(precond, preset)(model, **options)
    _train(model, opt, batches[:2])
    weights = [p.detach().clone() for p in model.parameters()]
    state = {p: {path: t.clone() for path, t in _leaves(opt.state[p])} for p in opt.state}
    with pytest.raises(FloatingPointError):
        _poisoned_step(model, opt, batches[2])  # a recording step (factor_every=2)
    capture = opt.kfac_capture
    assert capture.steps == 2 and not any(capture.has_statistics(p) for p in capture.params)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert {p: dict(_leaves(opt.state[p])).keys() for p in opt.state} == {p: kept.keys() for p, kept in state.items()}
    for p, kept in state.items():
        after = dict(_leaves(opt.state[p]))
        assert all(torch.equal(after[path], value) for path, value in kept.items()), "the refused step changed state"
    _train(model, opt, batches[2:])
    assert all(torch.equal(p.detach(), e) for p, e in zip(model.parameters(), expected, strict=True))
    capture.remove()


@pytest.mark.parametrize("preset", ["kfac", "ekfac"])
def test_a_skipped_step_drops_its_records_and_is_not_counted(preset):
    """``on_nonfinite="skip"``: nothing changes and the step is not counted, by the optimizer nor by the capture
    (whose count is the factor-update phase), so a run with a skipped NaN batch is bitwise the run without it.
    (The capture counted the skipped step, and recorded its statistics on other steps from then on.)"""
    batches = _lifecycle_batches(5)
    options = dict(lr=0.05, every=2, factor_every=2, state_dtype=F64, on_nonfinite="skip")
    expected = _uninterrupted(preset, batches, options)

    model = _lifecycle_model()
    opt = getattr(precond, preset)(model, **options)
    _train(model, opt, batches[:2])
    with pytest.warns(RuntimeWarning, match="skipped"):
        _poisoned_step(model, opt, batches[2])
    capture = opt.kfac_capture
    assert capture.steps == 2 and not any(capture.has_statistics(p) for p in capture.params)
    _train(model, opt, batches[2:])
    assert capture.steps == 5
    assert all(torch.equal(p.detach(), e) for p, e in zip(model.parameters(), expected, strict=True))
    capture.remove()


def _leaves(state, path=()):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(state, torch.Tensor):
        yield path, state


# --- bad input -------------------------------------------------------------------------------------------------


def test_bad_configuration_is_refused_with_clear_messages():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="reduction"):
        KFACCapture(layer, reduction="avg")
    with pytest.raises(ValueError, match="loss_terms"):
        KFACCapture(layer, loss_terms=0)
    with pytest.raises(ValueError, match="factor update period"):
        KFACCapture(layer, factor_every=0)
    with pytest.raises(TypeError, match="nn.Module"):
        KFACCapture(list(layer.parameters()))
    with pytest.raises(ValueError, match="bias_correction=False"):
        estimators.DenseSpectrum(estimators.Shampoo(), transport="reset")
    with pytest.raises(TypeError):
        estimators.KFAC(capture=None)
    with pytest.raises(ValueError, match="eps"):
        precond.kfac(layer, damping=-1.0)
    assert not layer._forward_hooks  # refused before any hook was registered
    with pytest.raises(KeyError, match="not captured"):
        KFACCapture(layer).role(torch.nn.Parameter(torch.zeros(2)))


def test_overlap_backward_is_refused_where_the_statistics_are_averaged(monkeypatch):
    """``attach`` refuses ``overlap_backward=True`` when the capture averages its statistics over ranks (plain DDP;
    ``tests/test_distributed_parts.py`` sees it on 2 ranks), as an ``Incompatible`` with the run-time rule's
    message in the table's form; one process (nothing averaged) is accepted."""
    from precond import compatibility

    layer = nn.Linear(3, 2)
    capture = KFACCapture(layer)
    layers = precond.Preconditioner(structure=structures.LayerMatrix(), estimator=estimators.KFAC(capture),
                                    basis=bases.Eigh(every=1), applier=precond.Power(p=1.0, eps_placement="outside"))
    opt = precond.Optimizer(list(layer.parameters()), preconditioner=layers, overlap_backward=True,
                            on_nonfinite="ignore")
    monkeypatch.setattr(capture, "averaging_group", lambda: (None, 2))  # as torch.distributed with 2 ranks
    rule = compatibility.BY_NAME["overlap_averaged_statistics"]
    with pytest.raises(compatibility.Incompatible) as refused:
        capture.attach(opt)
    assert refused.value.rule is rule and rule in compatibility.RUN_TIME_RULES and rule not in compatibility.RULES
    assert str(refused.value) == rule.message()
    assert isinstance(refused.value, ValueError)
    monkeypatch.undo()
    capture.attach(opt)  # one process: nothing to average
    capture.remove()


def test_kfac_needs_its_structure_and_the_state_parameters():
    layer = nn.Linear(3, 1).double()  # structures.Kronecker drops the unit output mode of its (1, 3) weight
    capture = KFACCapture(layer)
    layer(torch.randn(4, 3, dtype=F64)).sum().backward()
    wrong = precond.Preconditioner(structure=structures.Kronecker(), estimator=estimators.KFAC(capture),
                                   basis=bases.Eigh(every=1), applier=precond.Power(p=1.0, eps_placement="outside"))
    with pytest.raises(ValueError, match="LayerMatrix"):
        wrong.init_state(layer.weight.grad.reshape(1, 3), wrong.plan((1, 3)), params=(layer.weight,))
    right = attrs.evolve(wrong, structure=structures.LayerMatrix())
    with pytest.raises(RuntimeError, match="params="):
        right.init_state(layer.weight.grad.reshape(1, 1, 3), right.plan((1, 3)))
