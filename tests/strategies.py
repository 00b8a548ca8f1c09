"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import math

from hypothesis import strategies as st

import structures


@st.composite
def shapes(draw, min_order: int = 1, max_order: int = 4, max_dim: int = 5, max_numel: int = 240):
    order = draw(st.integers(min_order, max_order))
    dims = []
    for _ in range(order):
        room = max_numel // max(1, math.prod(dims))
        dims.append(draw(st.integers(1, max(1, min(max_dim, room)))))
    return tuple(dims)


def structure_strategy():
    max_dim = st.one_of(st.none(), st.integers(2, 5))
    large = st.sampled_from(["none", "diagonal"])
    return st.one_of(
        st.builds(structures.NMode, max_dim=max_dim, large=large),
        st.builds(structures.Kronecker, max_dim=st.one_of(st.none(), st.integers(2, 40)), large=large),
        st.builds(structures.OneSided, max_dim=max_dim, side=st.sampled_from(["smaller", "first", "last"])),
        st.just(structures.Diagonal()),
    )


seeds = st.integers(0, 2**31 - 1)
