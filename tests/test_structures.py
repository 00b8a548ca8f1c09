"""Structures plan a ``precond.Layout`` per parameter shape: the view is a pure reshape (same entries in the
same row-major order, exactly invertible), unit dims are dropped, and each viewed mode gets the kind the
structure's rules say (checked against an independent re-statement of those rules)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precond
import structures

SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)
max_dims = st.one_of(st.none(), st.integers(1, 7))
larges = st.sampled_from(["none", "diagonal"])
sides = st.sampled_from(["smaller", "first", "last"])

any_structure = st.one_of(
    st.builds(structures.NMode, max_dim=max_dims, large=larges),
    st.builds(structures.Kronecker, max_dim=max_dims, large=larges),
    st.builds(structures.OneSided, max_dim=max_dims, side=sides, large=larges),
    st.just(structures.Diagonal()),
)


# --- independent statements of the rules ----------------------------------------------------------------------
def expected_kind(d: int, max_dim, large: str) -> str:
    if d == 1:
        return "none"
    if max_dim is None or d <= max_dim:
        return "dense"
    return large


def kept_dims(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def expected_matrix_view(shape) -> tuple[int, ...]:
    kept = kept_dims(shape)
    if not kept:
        return (1,)
    if len(kept) == 1:
        return kept
    return (kept[0], math.prod(kept[1:]))


def expected_one_sided_kinds(view, max_dim, side, large) -> tuple[str, ...]:
    if len(view) == 1:
        return (expected_kind(view[0], max_dim, large),)
    a, b = view
    fits = [max_dim is None or d <= max_dim for d in view]
    if side == "first":
        preferred = 0
    elif side == "last":
        preferred = 1
    else:
        preferred = 0 if a <= b else 1
    other = 1 - preferred
    kinds = ["none", "none"]
    if view[preferred] > 1 and fits[preferred]:
        kinds[preferred] = "dense"
    elif view[other] > 1 and fits[other]:
        kinds[other] = "dense"
    else:
        kinds[preferred] = expected_kind(view[preferred], max_dim, large)
    return tuple(kinds)


# --- views --------------------------------------------------------------------------------------------------------
@SETTINGS
@given(shape=shapes, structure=any_structure, seed=seeds)
def test_view_is_a_row_major_reshape_and_unview_inverts_it(shape, structure, seed):
    layout = structure.plan(shape)
    assert isinstance(layout, precond.Layout)
    assert tuple(layout.shape) == tuple(shape)
    assert math.prod(layout.view_shape) == math.prod(shape)
    assert len(layout.kinds) == len(layout.view_shape)
    assert all(kind in ("dense", "diagonal", "none") for kind in layout.kinds)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    viewed = layout.view(x)
    assert tuple(viewed.shape) == tuple(layout.view_shape)
    assert torch.equal(viewed.reshape(-1), x.reshape(-1))
    back = layout.unview(viewed)
    assert tuple(back.shape) == tuple(shape)
    assert torch.equal(back, x)
    # unview also works on any tensor of the view shape (not only on one produced by view)
    y = torch.arange(layout.numel, dtype=torch.float64).reshape(layout.view_shape)
    assert torch.equal(layout.unview(y), y.reshape(shape))


@SETTINGS
@given(shape=shapes, structure=any_structure)
def test_view_drops_unit_dims(shape, structure):
    layout = structure.plan(shape)
    if math.prod(shape) == 1:
        assert tuple(layout.view_shape) == (1,)
        assert tuple(layout.kinds) == ("none",)
    else:
        assert 1 not in layout.view_shape


@SETTINGS
@given(shape=shapes, max_dim=max_dims, large=larges)
def test_nmode_keeps_every_nonunit_mode(shape, max_dim, large):
    layout = structures.NMode(max_dim=max_dim, large=large, vectors="dense").plan(shape)
    kept = kept_dims(shape)
    if not kept:
        assert tuple(layout.view_shape) == (1,) and tuple(layout.kinds) == ("none",)
        return
    assert tuple(layout.view_shape) == kept
    assert tuple(layout.kinds) == tuple(expected_kind(d, max_dim, large) for d in kept)


@SETTINGS
@given(shape=shapes, max_dim=max_dims, large=larges)
def test_kronecker_views_first_dim_by_the_rest(shape, max_dim, large):
    layout = structures.Kronecker(max_dim=max_dim, large=large, vectors="dense").plan(shape)
    view = expected_matrix_view(shape)
    assert tuple(layout.view_shape) == view
    if view == (1,):
        assert tuple(layout.kinds) == ("none",)
    else:
        assert tuple(layout.kinds) == tuple(expected_kind(d, max_dim, large) for d in view)


@SETTINGS
@given(shape=shapes, max_dim=max_dims, side=sides, large=larges)
def test_one_sided_has_at_most_one_dense_mode(shape, max_dim, side, large):
    layout = structures.OneSided(max_dim=max_dim, side=side, large=large, vectors="dense").plan(shape)
    view = expected_matrix_view(shape)
    assert tuple(layout.view_shape) == view
    assert sum(kind == "dense" for kind in layout.kinds) <= 1
    assert tuple(layout.kinds) == expected_one_sided_kinds(view, max_dim, side, large)


@SETTINGS
@given(shape=shapes.filter(lambda s: len(kept_dims(s)) >= 2))
def test_one_sided_default_picks_the_smaller_side(shape):
    layout = structures.OneSided().plan(shape)
    a, b = layout.view_shape
    dense = layout.dense_modes
    assert len(dense) == 1
    assert layout.view_shape[dense[0]] == min(a, b)
    if a <= b:
        assert dense == (0,)


@SETTINGS
@given(shape=shapes)
def test_diagonal_is_one_flat_identity_mode(shape):
    layout = structures.Diagonal().plan(shape)
    assert tuple(layout.view_shape) == (math.prod(shape),)
    assert tuple(layout.kinds) == ("none",)


@SETTINGS
@given(shape=shapes, structure=any_structure)
def test_layout_derived_quantities(shape, structure):
    layout = structure.plan(shape)
    assert layout.order == len(layout.view_shape)
    assert layout.numel == math.prod(shape)
    for k, d in enumerate(layout.view_shape):
        assert layout.complement(k) * d == layout.numel
    assert layout.dense_modes == tuple(k for k, kind in enumerate(layout.kinds) if kind == "dense")
    assert layout.spectral_modes == tuple(k for k, kind in enumerate(layout.kinds) if kind != "none")
    expected_state = sum(2 * d * d + d if kind == "dense" else d if kind == "diagonal" else 0
                         for d, kind in zip(layout.view_shape, layout.kinds, strict=True))
    assert layout.state_numel() == expected_state


@SETTINGS
@given(shape=shapes.filter(lambda s: any(d > 3 for d in s)), large=larges)
def test_max_dim_turns_large_modes_into_the_large_policy(shape, large):
    layout = structures.NMode(max_dim=3, large=large, vectors="dense").plan(shape)
    for d, kind in zip(layout.view_shape, layout.kinds, strict=True):
        if d > 3:
            assert kind == large
        elif d > 1:
            assert kind == "dense"


ALL_STRUCTURES = [structures.NMode(), structures.Kronecker(), structures.OneSided(), structures.Diagonal(),
                  structures.NMode(max_dim=2, large="diagonal"), structures.OneSided(side="last")]


@pytest.mark.parametrize("structure", ALL_STRUCTURES, ids=repr)
@pytest.mark.parametrize(
    "shape", [(), (1,), (5,), (2, 3), (3, 2), (3, 1, 4), (1, 4, 1), (2, 3, 4), (4, 3, 2, 2), (1, 1, 1, 1)]
)
def test_view_of_fixed_shapes_is_row_major(structure, shape):
    layout = structure.plan(shape)
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    viewed = layout.view(x)
    assert torch.equal(viewed, torch.arange(math.prod(shape), dtype=torch.float32).reshape(layout.view_shape))
    assert torch.equal(layout.unview(viewed), x)


def test_explicit_examples():
    conv = (8, 1, 3, 3)
    assert structures.NMode().plan(conv).view_shape == (8, 3, 3)
    assert structures.Kronecker().plan(conv).view_shape == (8, 9)
    assert structures.OneSided().plan(conv).kinds == ("dense", "none")  # 8 <= 9
    assert structures.OneSided().plan((9, 4)).kinds == ("none", "dense")
    assert structures.OneSided(max_dim=5, side="first").plan((9, 4)).kinds == ("none", "dense")
    assert structures.OneSided(max_dim=3, large="diagonal").plan((9, 4)).kinds == ("none", "diagonal")
    assert structures.Kronecker(max_dim=4, large="diagonal").plan((3, 2, 5)).kinds == ("dense", "diagonal")
    assert structures.NMode(max_dim=4).plan((3, 2, 5)).kinds == ("dense", "dense", "none")
    assert structures.NMode().plan((1, 1)).view_shape == (1,)
    assert structures.Diagonal().plan((2, 3)).view_shape == (6,)


# --- configuration -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [structures.NMode, structures.Kronecker, structures.OneSided])
@pytest.mark.parametrize("max_dim", [0, -3, 2.5, "8"])
def test_bad_max_dim_raises(cls, max_dim):
    with pytest.raises(ValueError, match="max_dim"):
        cls(max_dim=max_dim)


@pytest.mark.parametrize("cls", [structures.NMode, structures.Kronecker, structures.OneSided])
def test_bad_large_policy_raises(cls):
    with pytest.raises(ValueError, match="large"):
        cls(large="dense")


def test_bad_side_raises():
    with pytest.raises(ValueError, match="side"):
        structures.OneSided(side="middle")


def test_layout_rejects_inconsistent_plans():
    with pytest.raises(ValueError):
        precond.Layout((2, 3), (5,), ("none",), pattern="d0 d1 -> (d0 d1)")
    with pytest.raises(ValueError):
        precond.Layout((2, 3), (2, 3), ("dense",), pattern="d0 d1 -> d0 d1")


@pytest.mark.parametrize("cls", [structures.NMode, structures.Kronecker, structures.OneSided])
def test_vectors_get_a_diagonal_spectrum_unless_asked_for_dense(cls):
    for shape in [(7,), (1, 7), (7, 1, 1)]:
        assert cls().plan(shape).kinds == ("diagonal",)
        assert cls(vectors="dense").plan(shape).kinds == ("dense",)
        assert cls(max_dim=3, vectors="dense").plan(shape).kinds == ("none",)
    assert cls().plan((3, 4)).kinds.count("diagonal") == 0
    with pytest.raises(ValueError):
        cls(vectors="sometimes")
