"""Muon: ``precond.NewtonSchulz`` against the SVD and the composed polynomial (float64), the Polar Express table
against the paper's construction, and ``precond.muon`` against ``torch.optim.Muon`` / ``torch.optim.AdamW``."""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bases
import estimators
import precond
import structures
from precond.appliers.newton_schulz import _POLAR_EXPRESS_RAW, JORDAN, POLAR_EXPRESS
from precond.parts import ApplyContext
from precond.state import ParamState

from reference import F64, reference_scale
from strategies import seeds

# --- references written from the papers -------------------------------------------------------------------------

def composed_polynomial_of_svd(m: torch.Tensor, table, steps: int, margin: float, eps: float) -> torch.Tensor:
    """``U p(σ / max(margin‖M‖_F, eps)) Vᵀ`` with ``p = p_T ∘ … ∘ p_1`` applied to the singular values alone."""
    u, sigma, vh = torch.linalg.svd(m, full_matrices=False)
    x = sigma / max(margin * float(torch.linalg.matrix_norm(m)), eps)
    for t in range(steps):
        a, b, c = table[min(t, len(table) - 1)]
        x = a * x + b * x**3 + c * x**5
    return u @ torch.diag(x) @ vh


def minimax_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """The odd quintic closest to 1 in sup norm on ``[lo, hi]`` (Remez: ``1 − p`` equioscillates at ``lo``, its two
    interior extrema and ``hi``); the Padé limit ``(15x − 10x³ + 3x⁵)/8`` (scaled to ``hi``) once ``lo ≈ hi``."""
    if lo / hi > 1 - 5e-6:
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    nodes = [(3 * lo + hi) / 4, (lo + 3 * hi) / 4]
    for _ in range(200):
        x = np.array([lo, *nodes, hi])
        system = np.stack([x, x**3, x**5, np.array([1.0, -1.0, 1.0, -1.0])], axis=1)
        a, b, c, _ = np.linalg.solve(system, np.ones(4))
        root = math.sqrt(9 * b * b - 20 * a * c)  # p'(x) = a + 3b x² + 5c x⁴ = 0 in y = x²
        new = sorted(math.sqrt(y) for y in ((-3 * b - root) / (10 * c), (-3 * b + root) / (10 * c)))
        if max(abs(n - o) for n, o in zip(new, nodes, strict=True)) < 1e-16:
            break
        nodes = new
    return float(a), float(b), float(c)


def polar_express_construction(lower: float = 1e-3, iterations: int = 8, cushion: float = 0.02407327424182761):
    """Amsel et al. 2025, Section 4 and Appendix G: on ``[ℓ_t, u_t]`` (``ℓ_1 = 10⁻³``, ``u_1 = 1``) the optimal quintic
    for ``[max(ℓ_t, cushion·u_t), u_t]``, rescaled so ``p(ℓ_t) + p(u_t) = 2``; then ``ℓ_{t+1} = p(ℓ_t)``,
    ``u_{t+1} = 2 − ℓ_{t+1}``. No safety factor."""
    lo, hi, table = lower, 1.0, []
    for _ in range(iterations):
        a, b, c = minimax_odd_quintic(max(lo, cushion * hi), hi)
        k = 2 / ((a * lo + b * lo**3 + c * lo**5) + (a * hi + b * hi**3 + c * hi**5))
        a, b, c = a * k, b * k, c * k
        table.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return table


def _apply(applier: precond.NewtonSchulz, direction: torch.Tensor) -> torch.Tensor:
    layout = structures.Matrix().plan(direction.shape[1:])
    ps = ParamState.empty(layout, False, direction.shape[0], direction.dtype, direction.device)
    return applier.apply(direction, ApplyContext(ps=ps, layout=layout, grad=direction, step=1))


# --- NewtonSchulz ------------------------------------------------------------------------------------------------

NEWTON_SCHULZ_QUINTIC = (15 / 8, -10 / 8, 3 / 8)
CUBIC = (1.5, -0.5, 0.0)


@given(rows=st.integers(1, 12), cols=st.integers(1, 12), batch=st.integers(1, 3), steps=st.integers(1, 10),
       coefficients=st.sampled_from([JORDAN, "polar_express", (CUBIC, NEWTON_SCHULZ_QUINTIC)]),
       scale=st.sampled_from(["none", "original", "match_rms_adamw"]), rank=st.integers(0, 12),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]), seed=seeds)
def test_float64_newton_schulz_is_the_composed_polynomial_of_the_singular_values(
        rows, cols, batch, steps, coefficients, scale, rank, magnitude, seed):
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, rows, cols) or min(rows, cols)  # rank-deficient matrices too: p(0) = 0
    m = magnitude * torch.randn(batch, rows, rank, generator=gen, dtype=F64) @ torch.randn(
        batch, rank, cols, generator=gen, dtype=F64)
    applier = precond.NewtonSchulz(steps=steps, coefficients=coefficients, dtype=F64, scale=scale)
    if coefficients == "polar_express":
        table, margin = POLAR_EXPRESS, 1.01
    else:
        table, margin = ([coefficients] if isinstance(coefficients[0], float) else list(coefficients)), 1.0
    out = _apply(applier, m)
    for i in range(batch):
        expected = reference_scale(scale, rows, cols) * composed_polynomial_of_svd(m[i], table, steps, margin, 1e-7)
        torch.testing.assert_close(out[i], expected, atol=1e-10, rtol=0)


def test_polar_express_converges_to_the_polar_factor_in_float64():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(9, 5, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    m = u @ torch.diag(torch.logspace(0, -2.5, 5, dtype=F64)) @ v.T  # σ_min/σ_max ≈ 3e-3 > ℓ = 1e-3
    out = _apply(precond.NewtonSchulz(steps=10, coefficients="polar_express", dtype=F64), m[None])[0]
    torch.testing.assert_close(out, u @ v.T, atol=1e-6, rtol=0)  # the unsafe last polynomial makes σ → 1 exactly


def test_polar_express_table_is_the_papers_construction_with_safety_factor_1_01():
    derived = polar_express_construction()
    assert len(_POLAR_EXPRESS_RAW) == 8
    for t, (mine, published) in enumerate(zip(derived, _POLAR_EXPRESS_RAW, strict=True)):
        # as ℓ_t → u_t the fit grows ill-conditioned; the eighth is printed as its limit (15/8, -10/8, 3/8)
        np.testing.assert_allclose(mine, published, rtol=((1e-12,) * 6 + (1e-9, 1e-8))[t])
    for t, ((a, b, c), (sa, sb, sc)) in enumerate(zip(_POLAR_EXPRESS_RAW, POLAR_EXPRESS, strict=True)):
        k = 1.01 if t < 7 else 1.0  # p_t(x/1.01), all but the last (Section 4.4)
        np.testing.assert_allclose((sa, sb, sc), (a / k, b / k**3, c / k**5), rtol=1e-15)
    assert precond.NewtonSchulz(coefficients="polar_express", steps=10).schedule()[7:] == [(1.875, -1.25, 0.375)] * 3


def test_coefficients_are_normalised_and_scheduled():
    assert precond.NewtonSchulz(coefficients=[1, -2, 3]).coefficients == (1.0, -2.0, 3.0)
    applier = precond.NewtonSchulz(steps=4, coefficients=[CUBIC, NEWTON_SCHULZ_QUINTIC])
    assert applier.schedule() == [CUBIC, NEWTON_SCHULZ_QUINTIC, NEWTON_SCHULZ_QUINTIC, NEWTON_SCHULZ_QUINTIC]
    assert precond.NewtonSchulz().schedule() == [JORDAN] * 5


@pytest.mark.parametrize("kwargs, words", [
    ({"steps": 0}, "number of Newton–Schulz iterations"),
    ({"steps": 2.5}, "number of Newton–Schulz iterations"),
    ({"steps": True}, "number of Newton–Schulz iterations"),
    ({"coefficients": "jordan"}, "polar_express"),
    ({"coefficients": (1.0, 2.0)}, "triple"),
    ({"coefficients": ((1.0, 2.0, 3.0), (1.0, 2.0))}, "triple"),
    ({"coefficients": (1.0, float("nan"), 2.0)}, "finite"),
    ({"coefficients": ()}, "triple"),
    ({"coefficients": (1.0, "b", 2.0)}, "triple"),
    ({"eps": 0.0}, "floor of the normalising Frobenius norm"),
    ({"eps": -1e-7}, "floor of the normalising Frobenius norm"),
])
def test_bad_newton_schulz_arguments_raise_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        precond.NewtonSchulz(**kwargs)


@pytest.mark.parametrize("kwargs", [{"dtype": torch.int32}, {"dtype": "bfloat16"}, {"scale": "rms"},
                                    {"scale": None}])
def test_bad_newton_schulz_dtype_or_scale_raises(kwargs):
    with pytest.raises(ValueError, match="dtype|scale"):
        precond.NewtonSchulz(**kwargs)


def test_newton_schulz_refuses_a_view_that_is_not_a_matrix():
    layout = structures.NMode().plan((2, 3, 4))
    ps = ParamState.empty(layout, False, 1, torch.float32, torch.device("cpu"))
    direction = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="structures.Matrix"):
        precond.NewtonSchulz().apply(direction, ApplyContext(ps=ps, layout=layout, grad=direction, step=1))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        structures.Matrix().plan((5,))


@pytest.mark.parametrize("shape, view", [((4, 2, 3, 3), (4, 18)), ((6, 5), (6, 5)), ((1, 7), (1, 7)),
                                         ((3, 1, 1, 2), (3, 2)), ((1, 1), (1, 1)), ((2, 3, 4), (2, 12))])
def test_matrix_structure_views_out_by_the_rest_as_reshape_does(shape, view):
    layout = structures.Matrix().plan(shape)
    assert layout.view_shape == view and layout.kinds == ("none", "none") and layout.state_numel() == 0
    w = torch.randn(shape)
    assert torch.equal(layout.view(w), w.reshape(shape[0], -1))
    assert torch.equal(layout.unview(layout.view(w)), w)


# --- precond.muon against torch ----------------------------------------------------------------------------------

SHAPES = [(6, 10), (6, 10), (10, 6), (8, 8), (1, 7), (12, 4)]  # a stacked pair, wide, tall, square, a row


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    return [torch.nn.Parameter(t.clone()) for t in init], [torch.nn.Parameter(t.clone()) for t in init]


def _set_gradients(pairs, step):
    for i, (p, q) in enumerate(pairs):
        gen = torch.Generator().manual_seed(100 * step + i)
        g = torch.randn(p.shape, generator=gen) + 0.1 * p.detach() ** 3
        p.grad, q.grad = g.clone(), g.clone()


def _bf16_noise_bound(lr, scale, steps):
    """bfloat16 noise: two ulps (ε = 2⁻⁷) of each update entry (|entry| ≤ lr·scale), accumulated over ``steps``.
    A mere reordering of the bfloat16 products (no transpose of the tall side) stays within it; a wrong scale rule
    or Nesterov convention does not."""
    return steps * lr * scale * 2.0**-6


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov, weight_decay", [(True, 0.1), (False, 0.1), (True, 5.0)])
def test_muon_tracks_torch_muon_for_ten_steps_within_bf16_noise(adjust_lr_fn, nesterov, weight_decay):
    """``weight_decay = 5`` (``η·wd = 0.1``) makes decay after the update, or with the adjusted ``η``, visible."""
    ours, theirs = _params(SHAPES)
    init = [p.detach().clone() for p in ours]
    kw = {
        "lr": 0.02, "momentum": 0.95, "nesterov": nesterov, "weight_decay": weight_decay, "adjust_lr_fn": adjust_lr_fn
    }
    opt, ref = precond.muon(ours, **kw), torch.optim.Muon(theirs, **kw)
    for step in range(1, 11):
        _set_gradients(list(zip(ours, theirs, strict=True)), step)
        opt.step()
        ref.step()
    for p, q, p0 in zip(ours, theirs, init, strict=True):
        bound = _bf16_noise_bound(0.02, reference_scale(adjust_lr_fn, *p.shape), 10)
        assert (p - q).abs().max() <= bound, (tuple(p.shape), float((p - q).abs().max()), bound)
        assert (p.detach() - p0).abs().max() > 10 * bound  # the parameters moved far more than the tolerance


def test_muon_differs_from_torch_muon_when_the_scale_rule_differs():
    """The tracking bound is tight enough to tell the two scale rules apart (so the test above can fail)."""
    ours, theirs = _params(SHAPES)
    opt = precond.muon(ours, lr=0.02, adjust_lr_fn="original")
    ref = torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw")
    for step in range(1, 11):
        _set_gradients(list(zip(ours, theirs, strict=True)), step)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        assert (p - q).abs().max() > 3 * _bf16_noise_bound(0.02, reference_scale("original", *p.shape), 10)


def test_a_conv_kernel_steps_as_torch_muon_on_its_out_by_rest_matrix():
    gen = torch.Generator().manual_seed(3)
    kernel = torch.randn(4, 3, 3, 3, generator=gen)
    ours, theirs = torch.nn.Parameter(kernel.clone()), torch.nn.Parameter(kernel.reshape(4, -1).clone())
    opt = precond.muon([ours], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    assert opt.layout(ours).view_shape == (4, 27)
    for _ in range(5):
        g = torch.randn(4, 3, 3, 3, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.reshape(4, -1).clone()
        opt.step()
        ref.step()
    assert (ours.detach().reshape(4, -1) - theirs).abs().max() <= _bf16_noise_bound(0.02, 0.2 * math.sqrt(27), 5)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 6)
        self.hidden = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 11, bias=False)

    def forward(self, tokens):
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(tokens)))))


def _loss(net, step):
    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 11, (5, 4), generator=gen)
    return torch.nn.functional.cross_entropy(net(tokens).reshape(-1, 11), tokens.roll(1, dims=1).reshape(-1))


def test_vectors_embeddings_and_heads_go_to_the_adam_part_as_torch_adamw():
    ours, theirs = _Net(), _Net()
    opt = precond.muon(ours.named_parameters(), lr=0.02, weight_decay=0.1, adam_lr=3e-3, adam_betas=(0.9, 0.99),
                       adam_eps=1e-8, adam_params=["embed.weight", "head.weight"])
    hidden = [theirs.hidden.weight]
    rest = [p for name, p in theirs.named_parameters() if name != "hidden.weight"]
    ref_muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1)
    ref_adam = torch.optim.AdamW(rest, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 5]
    for step in range(1, 11):  # gradients of each parameter from its own values only: no coupling through a loss
        _set_gradients(list(zip(ours.parameters(), theirs.parameters(), strict=True)), step)
        for o in (opt, ref_muon, ref_adam):
            o.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        if name == "hidden.weight":
            assert (p - q).abs().max() <= _bf16_noise_bound(0.02, reference_scale("original", 8, 6), 10), name
        else:
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)
            assert not torch.equal(p, _Net().state_dict()[name]), name  # it moved


def test_param_groups_route_by_use_muon_or_by_dimension():
    net = _Net()
    groups = [{"params": [net.hidden.weight, net.hidden.bias], "lr": 0.01},
              {"params": [net.embed.weight, net.head.weight], "use_muon": False, "lr": 1e-3},
              {"params": [net.norm.weight], "use_muon": False}]
    opt = precond.muon(groups, adam_lr=5e-4, weight_decay=0.1, adam_weight_decay=0.0)
    summary = [(g["use_muon"], [tuple(p.shape) for p in g["params"]], g["lr"], g["weight_decay"], g["momentum"],
                g["bias_correction"]) for g in opt.param_groups]
    assert summary == [(True, [(8, 6)], 0.01, 0.1, 0.95, False), (False, [(8,)], 0.01, 0.0, 0.9, True),
                       (False, [(11, 6), (11, 8)], 1e-3, 0.0, 0.9, True), (False, [(8,)], 5e-4, 0.0, 0.9, True)]
    assert isinstance(opt.param_groups[0]["preconditioner"].applier, precond.NewtonSchulz)
    assert all(isinstance(g["preconditioner"].applier, precond.Power) for g in opt.param_groups[1:])


@pytest.mark.parametrize("call, error, words", [
    (lambda net: precond.muon(net.parameters(), adjust_lr_fn="spectral"), ValueError, "adjust_lr_fn"),
    (lambda net: precond.muon(net.named_parameters(), adam_params=["embedding.weight"]), ValueError,
     "'embedding.weight'.*embed.weight"),
    (lambda net: precond.muon(net.parameters(), adam_params=["embed.weight"]), ValueError, "named_parameters"),
    (lambda net: precond.muon(net.parameters(), adam_params=[3]), TypeError, "parameters or their names"),
    (lambda net: precond.muon([{"params": [net.hidden.bias], "use_muon": True}]), ValueError, "fewer than 2"),
    (lambda net: precond.muon([{"params": [net.hidden.bias], "use_muon": 1}]), TypeError, "True or False"),
    (lambda net: precond.muon(net.parameters(), ns_steps=0), ValueError, "Newton–Schulz iterations"),
])
def test_bad_muon_arguments_raise_at_construction(call, error, words):
    with pytest.raises(error, match=words):
        call(_Net())


@pytest.mark.parametrize("coefficients", [JORDAN, "polar_express"])
def test_muon_trains_a_conv_mlp(coefficients):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    gen = torch.Generator().manual_seed(1000)
    x = torch.randn(16, 2, 5, 5, generator=gen)
    y = x.mean(dim=(1, 2, 3)).unsqueeze(1).sin()
    opt = precond.muon(model.parameters(), lr=0.02, ns_coefficients=coefficients)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert torch.nn.functional.mse_loss(model(x), y).item() < 0.1 * start


def test_muon_state_dict_round_trip_resumes_bit_for_bit():
    def run(net, opt, steps):
        for step in steps:
            opt.zero_grad()
            _loss(net, step).backward()
            opt.step()

    net = _Net()
    opt = precond.muon(net.named_parameters(), adam_params=["embed.weight"], ns_coefficients="polar_express")
    run(net, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buffer)
    run(net, opt, range(3, 6))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    other = _Net()
    other.load_state_dict(saved["net"])
    resumed = precond.muon(other.named_parameters(), adam_params=["embed.weight"], ns_coefficients="polar_express")
    resumed.load_state_dict(saved["opt"])
    run(other, resumed, range(3, 6))
    for p, q in zip(net.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)


def test_stateless_estimator_and_matrix_structure_keep_no_state():
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = precond.Optimizer([p], lr=0.1, momentum=0.0, preconditioner=precond.Preconditioner(
        structure=structures.Matrix(), estimator=estimators.Stateless(), basis=bases.Identity(),
        applier=precond.NewtonSchulz(dtype=F64, steps=12, coefficients="polar_express"), first_step="update"))
    before = p.detach().clone()
    p.grad = torch.randn(5, 3)
    opt.step()
    u, _, vh = torch.linalg.svd(p.grad.double(), full_matrices=False)
    torch.testing.assert_close((before - p.detach()).double() / 0.1, u @ vh, atol=1e-5, rtol=0)
    state = opt.state[p]
    assert state["estimator"] == {"S": {}, "lambda": {}} and state["basis"] == {"Q": {}} and state["applier"] == {}


# --- precond.Muon, a class (issue 21) -----------------------------------------------------------------------------

def _summary(opt):
    """The param groups as plain data: routing, shapes, hyperparameters and the part that steps them."""
    return [(g["use_muon"], [tuple(p.shape) for p in g["params"]], g["lr"], g["momentum"], g["weight_decay"],
             g["nesterov"], g["bias_correction"], type(g["preconditioner"].applier).__name__)
            for g in opt.param_groups]


def test_muon_is_a_class_that_clients_build_with_their_own_param_groups():
    """``precond.muon`` is ``precond.Muon``, a ``precond.Optimizer`` subclass: Hugging Face's ``Trainer`` calls
    ``optimizer_cls(grouped_parameters, **optimizer_kwargs)`` with its decay / no-decay groups, which are routed
    (matrices to Newton–Schulz, vectors to Adam) with their weight decay kept."""
    assert inspect.isclass(precond.muon) and precond.muon is precond.Muon
    assert issubclass(precond.Muon, precond.Optimizer) and issubclass(precond.Muon, torch.optim.Optimizer)
    net = _Net()
    decay = [p for name, p in net.named_parameters() if p.ndim >= 2 and name != "embed.weight"]
    no_decay = [p for name, p in net.named_parameters() if p.ndim < 2]
    optimizer_cls, optimizer_kwargs = precond.muon, {"lr": 0.02, "adam_lr": 1e-3, "adam_betas": (0.9, 0.99)}
    opt = optimizer_cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        **optimizer_kwargs)
    assert isinstance(opt, precond.Muon) and repr(opt).startswith("Muon (")
    assert _summary(opt) == [(True, [(8, 6), (11, 8)], 0.02, 0.95, 0.1, True, False, "NewtonSchulz"),
                             (False, [(8,), (8,), (8,)], 1e-3, 0.9, 0.0, False, True, "Power")]
    for step in range(3):
        opt.zero_grad()
        _loss(net, step).backward()
        opt.step()


def _add_later_runs(first, later, later_options, named=False, **kwargs):
    """Two runs of the same model: one optimizer built with ``[first, later]`` as two groups, and one built with
    ``first`` whose ``later`` group is added with ``add_param_group`` after two steps (before them ``later`` is
    frozen in both runs, as Lightning's ``BackboneFinetuning`` does). Returns both optimizers and both nets."""
    runs = []
    for add_later in (False, True):
        net = _Net()
        params = dict(net.named_parameters())
        pick = ((lambda names, params=params: [(n, params[n]) for n in names]) if named
                else (lambda names, params=params: [params[n] for n in names]))
        for name in later:
            params[name].requires_grad_(False)
        groups = [{"params": pick(first)}]
        if not add_later:
            groups.append({"params": pick(later), **later_options})
        opt = precond.Muon(groups, **kwargs)
        for step in range(6):
            if step == 2:
                for name in later:
                    params[name].requires_grad_(True)
                if add_later:
                    opt.add_param_group({"params": pick(later), **later_options})
            opt.zero_grad()
            _loss(net, step).backward()
            opt.step()
        runs.append((net, opt))
    return runs


@pytest.mark.parametrize("later_options", [{}, {"lr": 1e-3}, {"lr": 5e-3, "use_muon": False}],
                         ids=["defaults", "own lr", "use_muon"])
@pytest.mark.parametrize("named", [False, True], ids=["tensors", "named"])
def test_add_param_group_routes_as_construction_and_steps_the_same(later_options, named):
    """A group of matrices and vectors added after construction (Lightning's ``BackboneFinetuning`` unfreezing a
    backbone) is routed as the same group given at construction: the same param groups (a mixed group becomes a
    Newton–Schulz group and an Adam group) and bit-identical steps. Before the routing, the added biases went to
    the Newton–Schulz part and the next step raised (``structures.Matrix ... got shape (8,)``)."""
    (net, opt), (twin, twin_opt) = _add_later_runs(["embed.weight", "head.weight"],
                                                   ["hidden.weight", "hidden.bias", "norm.weight", "norm.bias"],
                                                   later_options, named=named, adam_params=["embed.weight"]
                                                   if named else [])
    assert _summary(twin_opt) == _summary(opt)
    if "use_muon" not in later_options:
        assert [g["use_muon"] for g in twin_opt.param_groups[-2:]] == [True, False]
        assert [tuple(p.shape) for p in twin_opt.param_groups[-1]["params"]] == [(8,), (8,), (8,)]
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(net.hidden.bias, _Net().hidden.bias)  # the added vectors moved


def test_add_param_group_sends_adam_params_given_at_construction_to_adam():
    """A tensor of ``adam_params`` that joins later (an LM head unfrozen later) goes to Adam with the rest of its
    group's vectors; the names of ``adam_params``, which name parameters given at construction, are no error for a
    later group that does not hold them, and its other matrices go to Newton–Schulz."""
    net = _Net()
    named = dict(net.named_parameters())
    by_tensor = precond.Muon([named["hidden.weight"]], adam_params=[named["head.weight"]])
    by_tensor.add_param_group({"params": [named["head.weight"], named["hidden.bias"]]})
    assert [(g["use_muon"], [tuple(p.shape) for p in g["params"]]) for g in by_tensor.param_groups] == [
        (True, [(8, 6)]), (False, [(11, 8), (8,)])]
    by_name = precond.Muon([(n, named[n]) for n in ("hidden.weight", "embed.weight")], adam_params=["embed.weight"])
    by_name.add_param_group({"params": [(n, named[n]) for n in ("head.weight", "norm.weight")]})
    assert [(g["use_muon"], g["param_names"]) for g in by_name.param_groups] == [
        (True, ["hidden.weight"]), (False, ["embed.weight"]), (True, ["head.weight"]), (False, ["norm.weight"])]


def test_a_refused_half_of_an_added_group_leaves_the_optimizer_as_it_was():
    """A group split in two is added whole or not at all: here its vector half repeats a parameter already
    there, so the matrix half, accepted first, is taken back."""
    net = _Net()
    opt = precond.Muon([net.hidden.weight, net.hidden.bias])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [net.head.weight, net.hidden.bias]})
    assert len(opt.param_groups) == len(before)
    assert all(g == b for g, b in zip(opt.param_groups, before, strict=True))
    with pytest.raises(ValueError, match="fewer than 2"):
        opt.add_param_group({"params": [net.norm.weight], "use_muon": True})
    with pytest.raises(TypeError, match="not a set"):
        opt.add_param_group({"params": {net.norm.weight}})
    assert len(opt.param_groups) == len(before)


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_copied_muon_routes_added_groups_as_the_original(copy_with):
    """``copy.deepcopy`` and pickling keep the class, the Adam part's settings and ``adam_params`` (the copy's own
    tensors), so a group added to the copy is routed as one added to the original."""
    net = _Net()
    opt = precond.Muon([net.hidden.weight], adam_params=[net.head.weight], adam_lr=1e-3)
    copied = copy.deepcopy((net, opt)) if copy_with == "deepcopy" else pickle.loads(pickle.dumps((net, opt)))
    for model, o in ((net, opt), copied):
        assert type(o) is precond.Muon
        o.add_param_group({"params": [model.head.weight, model.norm.weight, model.embed.weight]})
    assert _summary(copied[1]) == _summary(opt)
    assert _summary(opt)[1:] == [(True, [(11, 6)], 0.02, 0.95, 0.0, True, False, "NewtonSchulz"),
                                 (False, [(11, 8), (8,)], 1e-3, 0.9, 0.0, False, True, "Power")]
