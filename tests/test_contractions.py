"""Property 1 (docs/design.md): the batched contractions (rotations, mode products, mode-k grams, rank-one scalings)
equal plain float64 references built from mode-k unfoldings (movedim → reshape → matmul → fold) and,
independently, from dense Kronecker products acting on the row-major ``vec``.

Every tensor carries a leading batch axis ``B``; each batch entry gets its own random factors, so a
contraction that mixes batch entries (or reads the wrong index of a factor) is caught.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from precond import contractions

F64 = torch.float64
SETTINGS = settings(max_examples=30, deadline=None)
seeds = st.integers(0, 2**31 - 1)


# --- independent references (plain torch, no library code) ------------------------------------------------
def unfold(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mode-k unfolding ``X_(k)``: mode k to the front, the remaining modes flattened row-major."""
    return torch.movedim(x, k, 0).reshape(x.shape[k], -1)


def fold(mat: torch.Tensor, k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`unfold` for a tensor of ``shape``."""
    moved = [shape[k]] + [s for j, s in enumerate(shape) if j != k]
    return torch.movedim(mat.reshape(moved), 0, k)


def apply_along(x: torch.Tensor, mat: torch.Tensor, k: int) -> torch.Tensor:
    """``mat`` applied to mode k of ``x`` (no batch axis): fold(mat @ X_(k))."""
    out_shape = list(x.shape)
    out_shape[k] = mat.shape[0]
    return fold(mat @ unfold(x, k), k, tuple(out_shape))


def reference_rotate(x: torch.Tensor, qs, transpose: bool) -> torch.Tensor:
    """Per batch entry: ``Q_kᵀ`` (``transpose``) or ``Q_k`` applied along every non-None mode."""
    out = []
    for b in range(x.shape[0]):
        y = x[b].to(F64)
        for k, q in enumerate(qs):
            if q is None:
                continue
            m = q[b].to(F64)
            y = apply_along(y, m.T if transpose else m, k)
        out.append(y)
    return torch.stack(out)


def reference_rotate_kron(x: torch.Tensor, qs, transpose: bool) -> torch.Tensor:
    """Second reference: ``(⊗_k A_k) vec(X)`` with ``A_k = Q_kᵀ`` (or ``Q_k``), ``I`` for a None mode."""
    shape = tuple(x.shape[1:])
    out = []
    for b in range(x.shape[0]):
        mats = []
        for k, q in enumerate(qs):
            if q is None:
                mats.append(torch.eye(shape[k], dtype=F64))
            else:
                m = q[b].to(F64)
                mats.append((m.T if transpose else m).contiguous())
        big = functools.reduce(torch.kron, mats)
        out.append((big @ x[b].to(F64).reshape(-1)).reshape(shape))
    return torch.stack(out)


def random_orthogonal(d: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# --- strategies --------------------------------------------------------------------------------------------
@st.composite
def batched_shapes(draw, max_numel: int = 1000):
    """``(B, d_1, …, d_N)`` with N in 1..4, d_k in 1..6, B in {1, 2}, total numel ≤ 2 * max_numel."""
    batch = draw(st.sampled_from([1, 2]))
    order = draw(st.integers(1, 4))
    dims: list[int] = []
    for _ in range(order):
        room = max_numel // max(1, math.prod(dims))
        dims.append(draw(st.integers(1, max(1, min(6, room)))))
    return (batch, *dims)


@st.composite
def rotation_case(draw, min_dense: int = 0, orthogonal: bool = False):
    shape = draw(batched_shapes())
    order = len(shape) - 1
    dense = draw(st.lists(st.booleans(), min_size=order, max_size=order))
    if min_dense and not any(dense):
        dense[draw(st.integers(0, order - 1))] = True
    seed = draw(seeds)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=F64)
    qs = []
    for k, is_dense in enumerate(dense):
        d = shape[k + 1]
        if not is_dense:
            qs.append(None)
        elif orthogonal:
            qs.append(torch.stack([random_orthogonal(d, gen) for _ in range(shape[0])]))
        else:
            qs.append(torch.randn(shape[0], d, d, generator=gen, dtype=F64))
    return x, qs


# --- rotate / unrotate / mode_product -------------------------------------------------------------------
@SETTINGS
@given(case=rotation_case())
def test_rotate_applies_transposed_factor_along_each_mode(case):
    x, qs = case
    got = contractions.rotate(x, qs)
    assert got.shape == x.shape and got.dtype == F64
    torch.testing.assert_close(got, reference_rotate(x, qs, transpose=True), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, reference_rotate_kron(x, qs, transpose=True), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=rotation_case())
def test_unrotate_applies_factor_along_each_mode(case):
    x, qs = case
    got = contractions.unrotate(x, qs)
    assert got.shape == x.shape
    torch.testing.assert_close(got, reference_rotate(x, qs, transpose=False), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, reference_rotate_kron(x, qs, transpose=False), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=rotation_case(min_dense=1))
def test_rotate_and_unrotate_differ_for_nonsymmetric_factors(case):
    """Guards against an implementation that ignores the ``inverse`` flag (Q vs Qᵀ)."""
    x, qs = case
    # only meaningful when some dense mode has d > 1 and x is not all zero
    if all(q is None or q.shape[-1] == 1 for q in qs):
        return
    fwd = contractions.rotate(x, qs)
    bwd = contractions.unrotate(x, qs)
    assert not torch.allclose(fwd, bwd)


@SETTINGS
@given(case=rotation_case(), data=st.data())
def test_mode_product_contracts_first_index(case, data):
    x, _ = case
    order = x.ndim - 1
    k = data.draw(st.integers(0, order - 1))
    d = x.shape[k + 1]
    gen = torch.Generator().manual_seed(data.draw(seeds))
    a = torch.randn(x.shape[0], d, d, generator=gen, dtype=F64)
    got = contractions.mode_product(x, a, k)
    # X ×_k A: R[.., a, ..] = Σ_i X[.., i, ..] A[i, a]  → Aᵀ along mode k
    expected = torch.stack([apply_along(x[b], a[b].T, k) for b in range(x.shape[0])])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # elementwise einsum check on the unfolding as a third formulation
    xk = torch.movedim(x, k + 1, 1).reshape(x.shape[0], d, -1)
    ek = torch.einsum("bip,bia->bap", xk, a)
    torch.testing.assert_close(torch.movedim(got, k + 1, 1).reshape(x.shape[0], d, -1), ek, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=rotation_case(orthogonal=True))
def test_unrotate_inverts_rotate_for_orthogonal_bases_float64(case):
    x, qs = case
    r = contractions.rotate(x, qs)
    torch.testing.assert_close(contractions.unrotate(r, qs), x, rtol=0, atol=1e-10)
    torch.testing.assert_close(contractions.rotate(contractions.unrotate(x, qs), qs), x, rtol=0, atol=1e-10)
    # an orthogonal rotation preserves the Frobenius norm of each batch entry
    torch.testing.assert_close(r.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-10, atol=1e-12)


@SETTINGS
@given(case=rotation_case(orthogonal=True))
def test_unrotate_inverts_rotate_for_orthogonal_bases_float32(case):
    x, qs = case
    x32 = x.float()
    qs32 = [None if q is None else q.float() for q in qs]
    r = contractions.rotate(x32, qs32)
    assert r.dtype == torch.float32
    back = contractions.unrotate(r, qs32)
    err = (back.double() - x).norm() / x.norm().clamp_min(1e-30)
    assert err < 1e-5
    torch.testing.assert_close(r.double(), reference_rotate(x, qs, transpose=True), rtol=1e-4, atol=1e-5)


@SETTINGS
@given(shape=batched_shapes(), seed=seeds)
def test_identity_modes_only_return_input(shape, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    nones = [None] * (len(shape) - 1)
    assert torch.equal(contractions.rotate(x, nones), x)
    assert torch.equal(contractions.unrotate(x, nones), x)


@SETTINGS
@given(case=rotation_case(min_dense=1))
def test_rotate_accepts_noncontiguous_input(case):
    x, qs = case
    # same values, but a non-contiguous memory layout (transpose of a transposed copy)
    y = x.transpose(0, -1).contiguous().transpose(0, -1)
    torch.testing.assert_close(
        contractions.rotate(y, qs), reference_rotate(x, qs, transpose=True), rtol=1e-12, atol=1e-12
    )


def test_rotate_rejects_wrong_number_of_bases():
    x = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="bases"):
        contractions.rotate(x, [None])
    with pytest.raises(ValueError, match="bases"):
        contractions.unrotate(x, [None, None, None])


# --- gram(s) -------------------------------------------------------------------------------------------------
@SETTINGS
@given(shape=batched_shapes(), seed=seeds, data=st.data())
def test_gram_equals_unfolding_times_its_transpose(shape, seed, data):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    order = len(shape) - 1
    k = data.draw(st.integers(0, order - 1))
    got = contractions.gram(x, k)
    d = shape[k + 1]
    assert got.shape == (shape[0], d, d)
    expected = torch.stack([unfold(x[b], k) @ unfold(x[b], k).T for b in range(shape[0])])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(shape=batched_shapes(), seed=seeds, data=st.data())
def test_grams_returns_each_requested_mode(shape, seed, data):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    order = len(shape) - 1
    modes = data.draw(st.lists(st.integers(0, order - 1), unique=True, max_size=order))
    got = contractions.grams(x, modes)
    assert sorted(got) == sorted(modes)
    for k in modes:
        expected = torch.stack([unfold(x[b], k) @ unfold(x[b], k).T for b in range(shape[0])])
        torch.testing.assert_close(got[k], expected, rtol=1e-12, atol=1e-12)


# --- scale / outer -------------------------------------------------------------------------------------------
@st.composite
def vectors_case(draw, min_vectors: int = 0):
    shape = draw(batched_shapes())
    order = len(shape) - 1
    present = draw(st.lists(st.booleans(), min_size=order, max_size=order))
    if min_vectors and not any(present):
        present[draw(st.integers(0, order - 1))] = True
    gen = torch.Generator().manual_seed(draw(seeds))
    vecs = [torch.randn(shape[0], shape[k + 1], generator=gen, dtype=F64) if p else None for k, p in enumerate(present)]
    x = torch.randn(shape, generator=gen, dtype=F64)
    return shape, x, vecs


def reference_outer(vecs, shape) -> torch.Tensor:
    """``⊗_k v_k`` per batch entry via repeated torch.outer (row-major), ones for None entries."""
    out = []
    for b in range(shape[0]):
        acc = torch.ones(1, dtype=F64)
        for k, v in enumerate(vecs):
            vk = torch.ones(shape[k + 1], dtype=F64) if v is None else v[b]
            acc = torch.outer(acc, vk).reshape(-1)
        out.append(acc.reshape(shape[1:]))
    return torch.stack(out)


@SETTINGS
@given(case=vectors_case())
def test_scale_multiplies_by_outer_product(case):
    shape, x, vecs = case
    got = contractions.scale(x, vecs)
    assert got.shape == x.shape
    torch.testing.assert_close(got, x * reference_outer(vecs, shape), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(case=vectors_case(min_vectors=1))
def test_outer_builds_rank_one_tensor(case):
    shape, _, vecs = case
    got = contractions.outer(vecs, shape)
    assert tuple(got.shape) == tuple(shape)
    torch.testing.assert_close(got, reference_outer(vecs, shape), rtol=1e-12, atol=1e-12)
    # einsum formulation for the all-present case as an extra check
    if all(v is not None for v in vecs):
        letters = "abcd"[: len(vecs)]
        eq = ",".join("Z" + c for c in letters) + "->Z" + letters
        torch.testing.assert_close(got, torch.einsum(eq, *vecs), rtol=1e-12, atol=1e-12)


def test_outer_needs_a_vector():
    with pytest.raises(ValueError):
        contractions.outer([None, None], (1, 2, 3))
