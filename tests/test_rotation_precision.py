"""Low-precision rotations (``precond.Optimizer(rotation_dtype=torch.bfloat16)``) against float64 references.

The contract (``precond.contractions``): the dense modes are multiplied one after another, each product taking both
operands rounded to the rotation dtype (``fl``) and accumulating in the state dtype:
``Y ← fl(Y) ×_k fl(Q_k)`` (``Q_kᵀ`` for the rotation back). The references below are written with float64
``einsum`` and an explicit rounding, independently of the library's batched matmuls.

- On integer-valued data every float32 sum is exact, so the library must give *exactly* the float64 math with
  rounded operands (the rounding of the intermediate products included, which is where the two dtypes differ).
- On random data with orthogonal bases the preconditioned direction is within a bound derived from the unit
  roundoff ``u`` of the rotation dtype (and the measured rounding error of the bases) of the exact float64 one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import precond
import structures
from precond.contractions import rotate, unrotate
from precond.parts import ApplyContext
from precond.state import ParamState

from reference import random_orthogonal
from strategies import shapes

F64 = torch.float64
LOW = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half an ulp at 1: 8 and 11 significant bits


# --- float64 references -------------------------------------------------------------------------------
def _rounded(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype).to(F64)


def _mode_product(y: torch.Tensor, q: torch.Tensor, k: int, inverse: bool) -> torch.Tensor:
    """float64 ``Y ×_k Q`` (``R[.., a, ..] = Σ_i Y[.., i, ..] Q[i, a]``), or ``Y ×_k Qᵀ`` when ``inverse``."""
    moved = y.movedim(k + 1, -1)
    out = torch.einsum("b...i,bia->b...a" if not inverse else "b...a,bia->b...i", moved, q)
    return out.movedim(-1, k + 1)


def _rotation_reference(x, bases, inverse, dtype=None):
    """The dense modes in order; with ``dtype``, both operands of every product rounded to it first."""
    y = x.to(F64)
    for k, q in enumerate(bases):
        if q is None:
            continue
        q = q.to(F64)
        if dtype is not None:
            y, q = _rounded(y, dtype), _rounded(q, dtype)
        y = _mode_product(y, q, k, inverse)
    return y


def _direction_reference(m, bases, spectra, p, dense=None, dtype=None):
    """``U = (R ⊙ S) ×_k Q_kᵀ`` with ``R = M ×_k Q_k`` and ``S = ⊗_k λ_k^{-p}`` (or ``V^{-p}``), ε = 0."""
    rotated = _rotation_reference(m, bases, False, dtype)
    if dense is not None:
        rotated = rotated * dense.to(F64) ** -p
    else:
        for k, lam in enumerate(spectra):
            if lam is not None:
                shape = [lam.shape[0]] + [1] * (m.ndim - 1)
                shape[k + 1] = lam.shape[1]
                rotated = rotated * lam.to(F64).view(shape) ** -p
    return _rotation_reference(rotated, bases, True, dtype)


# --- data ---------------------------------------------------------------------------------------------
@st.composite
def _problems(draw, max_dim=4):
    """A batch of 1–2 tensors of order 1–3, each mode dense (with a basis) or an identity mode."""
    shape = draw(shapes(min_order=1, max_order=3, max_dim=max_dim))
    dense = draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)))
    batch = draw(st.integers(1, 2))
    return (batch, *shape), dense, draw(st.integers(0, 2**31 - 1))


def _integer_data(shape, dense, seed, x_range=3, q_range=2):
    """Integer ``X`` and integer (not orthogonal) ``Q_k``: every float32 product and sum here is exact."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-x_range, x_range + 1, shape, generator=gen).float()
    bases = [torch.randint(-q_range, q_range + 1, (shape[0], d, d), generator=gen).float() if is_dense else None
             for d, is_dense in zip(shape[1:], dense, strict=True)]
    return x, bases


def _apply(m, bases, spectra, p, dense=None, rotation_dtype=None):
    """The library's ``Power`` applier (ε = 0, ε on each factor) on a hand-made state."""
    layout = structures.NMode(max_dim=None).plan(m.shape[1:])
    ps = ParamState(Q=list(bases), S=[None] * len(bases), lam=list(spectra))
    ctx = ApplyContext(ps=ps, layout=layout, grad=m, step=1, dense=dense, rotation_dtype=rotation_dtype)
    return precond.Power(p=p, eps=0.0, eps_placement="factor").apply(m, ctx)


# --- the contractions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW)
@given(problem=_problems(max_dim=5), inverse=st.booleans())
def test_rotation_equals_the_float64_math_with_rounded_operands_exactly(dtype, problem, inverse):
    """Integer data: ``|X| ≤ 1024`` for bfloat16 (exact only up to 256, so the inputs are rounded too), ``≤ 128`` for
    float16 (its intermediates stay below its largest value, 65504), ``|Q| ≤ 4``, ``d_k ≤ 5``: the intermediate
    products exceed 256 (bfloat16) or 2048 (float16) and are rounded before the next product, while every float32
    product and sum is exact (below 2²⁴), so the library must agree exactly."""
    shape, dense, seed = problem
    x, bases = _integer_data(shape, dense, seed, x_range=1024 if dtype == torch.bfloat16 else 128, q_range=4)
    expected = _rotation_reference(x, bases, inverse, dtype).float()
    actual = (unrotate if inverse else rotate)(x, bases, operand_dtype=dtype)
    assert actual.dtype == torch.float32 and actual.shape == x.shape
    assert torch.equal(actual, expected)


def test_inputs_and_intermediate_products_are_rounded():
    """bfloat16 has 8 significant bits. ``128.5`` rounds to 128 (a tie, to even). ``129 × 3 = 387 = 110000011₂`` needs
    9: the intermediate product is rounded (to 388, the even neighbour) before the next product, while float32
    keeps 387."""
    one = torch.ones(1, 1, 1)
    assert rotate(torch.tensor([[[128.5]]]), [one, one], operand_dtype=torch.bfloat16).item() == 128.0
    three = torch.full((1, 1, 1), 3.0)
    x = torch.tensor([[[129.0]]])
    assert rotate(x, [three, one], operand_dtype=torch.bfloat16).item() == 388.0
    assert unrotate(x, [three, one], operand_dtype=torch.bfloat16).item() == 388.0
    assert rotate(x, [three, one]).item() == 387.0


@pytest.mark.parametrize("dtype", LOW)
@given(problem=_problems(), p=st.sampled_from([0.5, 1.0]), use_dense=st.booleans())
def test_direction_equals_the_float64_math_with_rounded_operands_exactly(dtype, problem, p, use_dense):
    """The applier's direction ``(M ×_k Q_k ⊙ S) ×_k Q_kᵀ``: integer ``M``, ``Q_k`` and spectra whose ``-p`` powers are
    powers of two (exact), so every float32 step is exact and only the specified roundings remain."""
    shape, dense, seed = problem
    m, bases = _integer_data(shape, dense, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    levels = torch.tensor([1.0, 0.25] if p == 0.5 else [1.0, 0.5])  # λ^{-p} ∈ {1, 2}
    pick = lambda *size: levels[torch.randint(0, 2, size, generator=gen)]  # noqa: E731
    spectra = [pick(shape[0], d) for d in shape[1:]]
    dense_spectrum = pick(*shape) if use_dense else None
    expected = _direction_reference(m, bases, spectra, p, dense_spectrum, dtype).float()
    actual = _apply(m, bases, spectra, p, dense_spectrum, rotation_dtype=dtype)
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", LOW)
@given(problem=_problems())
def test_each_basis_is_rounded_once_per_direction(dtype, problem):
    """Both rotations of one direction use the same rounded copy of each basis: one cast of ``Q_k`` to the rotation
    dtype per dense mode, not one per rotation (the copies are the same numbers, so only the count can show it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shape, dense, seed = problem
    m, bases = _integer_data(shape, dense, seed)
    pointers = {q.data_ptr() for q in bases if q is not None}

    class CastsOfBases(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            source = args[0] if args else None
            if (func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
                    and isinstance(source, torch.Tensor) and source.data_ptr() in pointers):
                CastsOfBases.count += 1
            return func(*args, **kwargs)

    with CastsOfBases():
        _apply(m, bases, [torch.ones(shape[0], d) for d in shape[1:]], 0.5, rotation_dtype=dtype)
    assert CastsOfBases.count == len(pointers)


@pytest.mark.parametrize("dtype", LOW)
@given(problem=_problems(max_dim=6))
def test_direction_is_within_a_rounding_sized_error_of_the_exact_direction(dtype, problem):
    """Random ``M``, orthonormal ``Q_k`` and ``λ_k ∈ [0.8, 1.25]``. Each product rounds ``Y`` (relative error ≤ u in
    norm) and ``Q_k`` (measured: ``e_k = ‖fl(Q_k) − Q_k‖₂``), so one pass of rotations is off by at most
    ``δ = Π_k (1+u)(1+e_k) − 1`` relative to its input; the two passes around the scaling ``S`` (condition κ) give
    ``‖Ũ − U‖ ≤ κ δ (2 + δ) ‖U‖`` (plus float32 round-off)."""
    shape, dense, seed = problem
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen, dtype=F64)
    bases = [torch.stack([random_orthogonal(d, gen) for _ in range(shape[0])]) if is_dense else None
             for d, is_dense in zip(shape[1:], dense, strict=True)]
    spectra = [0.8 + 0.45 * torch.rand(shape[0], d, generator=gen, dtype=F64) for d in shape[1:]]
    u = UNIT_ROUNDOFF[dtype]
    delta = 1.0
    for q in bases:
        if q is not None:
            e = torch.linalg.matrix_norm(_rounded(q.float(), dtype) - q, ord=2).max().item()
            delta *= (1 + u) * (1 + e)
    delta -= 1.0
    scales = torch.ones(shape, dtype=F64)
    for k, lam in enumerate(spectra):
        view = [shape[0]] + [1] * (len(shape) - 1)
        view[k + 1] = shape[k + 1]
        scales = scales * lam.view(view) ** -0.5
    kappa = (scales.amax() / scales.amin()).item()
    exact = _direction_reference(m, bases, spectra, 0.5)
    actual = _apply(m.float(), [None if q is None else q.float() for q in bases], [lam.float() for lam in spectra],
                    0.5, rotation_dtype=dtype)
    error = (actual.to(F64) - exact).norm() / exact.norm()
    assert error <= kappa * delta * (2 + delta) + 1e-5


# --- the option ------------------------------------------------------------------------------------------
def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 5), (6, 5), (3, 4, 2), (7,)]]


def _run(preset="kl_shampoo", steps=7, params=None, optimizer=None, seed=1, **options):
    params = _params() if params is None else params
    opt = optimizer or getattr(precond, preset)(params, lr=1e-2, every=3, **options)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("bad", ["bfloat16", torch.float32, torch.float64, torch.int8, 16])
def test_bad_rotation_dtype_is_refused_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="rotation_dtype must be torch.bfloat16 or torch.float16"):
        precond.kl_shampoo(_params(), rotation_dtype=bad)
    opt = precond.soap(_params()[:1])
    with pytest.raises(ValueError, match="rotation_dtype"):
        opt.add_param_group({"params": _params()[1:2], "rotation_dtype": bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("preset", ["kl_shampoo", "soap", "shampoo"])
def test_default_is_unchanged_and_the_option_only_touches_the_rotations(preset):
    """``None`` (the default) steps bitwise as before; bfloat16 moves the weights slightly differently (it is not a
    no-op) and leaves every state tensor in float32."""
    default, opt = _run(preset)
    assert opt.param_groups[0]["rotation_dtype"] is None
    explicit, _ = _run(preset, rotation_dtype=None)
    assert all(torch.equal(a, b) for a, b in zip(default, explicit, strict=True))
    low, opt_low = _run(preset, rotation_dtype=torch.bfloat16)
    start = _params()
    for a, b, w in zip(default, low, start, strict=True):
        moved = (a - w).norm()
        if w.ndim > 1:  # a vector has a diagonal spectrum and no rotation
            assert 0 < (a - b).norm() <= 0.05 * moved
        else:
            assert torch.equal(a, b)
    for state in opt_low.state.values():
        tensors = [t for t in _leaves(state) if t.is_floating_point()]
        assert tensors and all(t.dtype == torch.float32 for t in tensors)


def _leaves(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)


def test_per_group_rotation_dtype():
    """A group hyperparameter: one group in bfloat16 steps as the all-bfloat16 optimizer does for it, the other as
    the default does."""
    params = _params()
    groups = [{"params": params[:2], "rotation_dtype": torch.bfloat16}, {"params": params[2:]}]
    mixed, _ = _run(params=params, optimizer=precond.kl_shampoo(groups, lr=1e-2, every=3))
    low, _ = _run(rotation_dtype=torch.bfloat16)
    default, _ = _run()
    assert all(torch.equal(a, b) for a, b in zip(mixed[:2], low[:2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(mixed[2:], default[2:], strict=True))


def test_deepcopy_and_state_dict_carry_the_option():
    params = _params()
    _, opt = _run(params=params, rotation_dtype=torch.bfloat16, steps=4)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    copied = copy.deepcopy(opt)
    assert copied.param_groups[0]["rotation_dtype"] is torch.bfloat16
    saved = opt.state_dict()
    assert saved["param_groups"][0]["rotation_dtype"] is torch.bfloat16
    loaded = precond.kl_shampoo(twin_params, lr=1e-2, every=3)  # built without the option: the checkpoint's wins
    loaded.load_state_dict(saved)
    assert loaded.param_groups[0]["rotation_dtype"] is torch.bfloat16
    after, _ = _run(params=params, optimizer=opt, steps=4, seed=2)
    resumed, _ = _run(params=twin_params, optimizer=loaded, steps=4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(after, resumed, strict=True))
    older = copy.deepcopy(saved)  # a checkpoint from before the option: the current setting stays
    for group in older["param_groups"]:
        del group["rotation_dtype"]
    fresh = precond.kl_shampoo([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, every=3,
                               rotation_dtype=torch.float16)
    fresh.load_state_dict(older)
    assert fresh.param_groups[0]["rotation_dtype"] is torch.float16


@pytest.mark.parametrize("preset", ["kl_shampoo", "soap"])
def test_emulated_capture_gives_the_eager_low_precision_updates(preset):
    """``capture="emulate"`` (the CPU reference of CUDA graphs) with bfloat16 rotations: the eager updates (float64
    state, so the device-side bias corrections cannot move a bfloat16 rounding)."""
    options = dict(rotation_dtype=torch.bfloat16, state_dtype=F64)
    params = [p.detach().double() for p in _params()]
    eager, _ = _run(preset, params=[torch.nn.Parameter(p.clone()) for p in params], **options)
    captured, _ = _run(preset, params=[torch.nn.Parameter(p.clone()) for p in params], capture="emulate", **options)
    for a, b in zip(eager, captured, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_overlapped_backward_gives_the_ordinary_low_precision_updates():
    def train(overlap):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        opt = precond.kl_shampoo(model.parameters(), lr=1e-2, every=2, on_nonfinite="ignore",
                                 overlap_backward=overlap, rotation_dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(4, 5, generator=gen)).pow(2).sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True), strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
def test_cuda_rotation_equals_the_float64_math_with_rounded_operands(dtype):
    """On CUDA (``bmm(..., out_dtype=float32)``): integer data, so the float32 accumulation is exact in any order."""
    patterns = [(True,), (True, True), (True, False, True), (True, True, True), (False, True, False)]
    for seed, dense in enumerate(patterns):
        shape = (2, *[3 + k for k in range(len(dense))])
        x, bases = _integer_data(shape, list(dense), seed, x_range=1024 if dtype == torch.bfloat16 else 128, q_range=4)
        for inverse in (False, True):
            expected = _rotation_reference(x, bases, inverse, dtype).float()
            actual = (unrotate if inverse else rotate)(
                x.cuda(), [None if q is None else q.cuda() for q in bases], operand_dtype=dtype)
            assert torch.equal(actual.cpu(), expected)


@pytest.mark.gpu
def test_cuda_graph_capture_with_low_precision_rotations():
    def run(capture):
        params = [torch.nn.Parameter(p.cuda()) for p in _params()]
        opt = precond.kl_shampoo(params, lr=1e-2, every=3, capture=capture, rotation_dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        for _ in range(7):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        return [p.detach().cpu() for p in params]

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# --- distributed ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_distributed_ranks_equal_one_process_with_low_precision_rotations():
    """``precond.DataParallel`` (owner and replicate, 2 gloo ranks) runs the same apply: every rank's parameters are
    bitwise those of one process with the same option."""
    from tests import distributed_workers as w
    from tests import rotation_precision_workers as r
    from tests.distributed_harness import spawn

    results = spawn(2, "tests.rotation_precision_workers", "parity")
    for preset in r.PRESETS:
        expected = w.trajectory({"preset": preset}, None, rotation_dtype=torch.bfloat16)[0]
        for mode in r.MODES:
            for rank, result in enumerate(results):
                actual = result[r.case_name(preset, mode)]
                assert all(torch.equal(a, b)
                           for a, b in zip(actual, expected, strict=True)), f"{preset} {mode} rank {rank}"


def test_torch_distributed_checkpoint_keeps_the_rotation_dtype_and_resumes_bitwise(tmp_path):
    """``rotation_dtype`` is a torch.dtype inside the param groups: DCP (single process) saves and restores it."""
    import warnings

    from precond.distributed import checkpoint

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
        return model, precond.SOAP(model.parameters(), lr=1e-2, every=2, rotation_dtype=torch.bfloat16)

    def train(model, optimizer, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(8, 6, generator=generator)).pow(2).mean().backward()
            optimizer.step()

    model, optimizer = make()
    train(model, optimizer, 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        checkpoint.save(model, optimizer, str(tmp_path))
        train(model, optimizer, 3, 2)
        resumed, reloaded = make()
        reloaded.param_groups[0]["rotation_dtype"] = torch.float16  # overwritten by the checkpoint's
        checkpoint.load(resumed, reloaded, str(tmp_path))
    assert reloaded.param_groups[0]["rotation_dtype"] is torch.bfloat16
    train(resumed, reloaded, 3, 2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
