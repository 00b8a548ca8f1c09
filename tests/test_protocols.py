"""The part protocols (``precond/parts.py``) declare everything the core reads of a part (issue 21).

A third-party part written against a protocol alone, with no library base class, no attrs and no member beyond
the protocol's, must work through construction and every step, refreshes included; and a part that lacks a
declared member must be refused when the ``Preconditioner`` is built, with a message that names what it lacks,
never fail later with an ``AttributeError``.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

import bases
import estimators
import precond
import structures
from precond.fallbacks import FallbackCounter
from precond.parts import Applier, Basis, Estimator, Structure, members
from precond.refresh import Refresh

EVERY = 2
STEPS = 2 * EVERY + 1  # crosses two refreshes


class ProtocolEigh:
    """Exactly :class:`precond.parts.Basis`: ``needs_factors``, ``every``, ``initialize``, ``refresh`` — a plain
    class (no attrs, no library base). ``Q, λ = eigh(S)`` in descending order; counts its refreshes."""

    needs_factors = True

    def __init__(self, every: Optional[int] = EVERY) -> None:
        self.every = every
        self.refreshes: list[int] = []

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        values, vectors = torch.linalg.eigh(factor)
        return Refresh(basis=vectors.flip(-1).contiguous(), eigenvalues=values.flip(-1).contiguous())

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        self.refreshes.append(index)
        return self.initialize(factor, counter)


class WithoutEvery:
    """:class:`ProtocolEigh` less ``every`` (so the core could not tell when to refresh)."""

    needs_factors = True

    def initialize(self, factor: torch.Tensor, counter: Optional[FallbackCounter] = None) -> Refresh:
        return ProtocolEigh().initialize(factor, counter)

    def refresh(self, factor: torch.Tensor, basis: torch.Tensor, counter: Optional[FallbackCounter] = None,
                index: int = 0) -> Refresh:
        return self.initialize(factor, counter)


def _preconditioner(basis) -> precond.Preconditioner:
    return precond.Preconditioner(structure=structures.NMode(max_dim=8), estimator=estimators.Shampoo(beta=0.9),
                                  basis=basis, applier=precond.Power(p=0.5, eps=1e-8))


def _run(basis, stagger: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))]
    optimizer = precond.Optimizer(params, lr=1e-2, preconditioner=_preconditioner(basis), state_dtype=torch.float64,
                                  stagger=stagger)
    for step in range(1, STEPS + 1):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i), dtype=p.dtype)
        optimizer.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("stagger", [False, True])
def test_a_basis_implementing_exactly_the_protocol_refreshes_and_equals_eigh(stagger):
    """2T+1 steps: every dense mode (2 of the (4, 3) weight, 3 of the (2, 3, 5) one; the vector is diagonal) is
    refreshed twice, and the parameters are bitwise those of ``bases.Eigh``, whose refresh is the same descending
    ``eigh``: the core treated the third-party basis exactly as its own."""
    basis = ProtocolEigh()
    got = _run(basis, stagger)
    assert len(basis.refreshes) == 2 * 5 and set(basis.refreshes) <= {0, 1, 2}, basis.refreshes
    if not stagger:
        assert sorted(basis.refreshes) == [0] * 5 + [1] * 5
    expected = _run(bases.Eigh(every=EVERY), stagger)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


def test_a_basis_that_never_refreshes_keeps_its_first_basis():
    """``every = None`` (the protocol's "never refreshed", as ``bases.Identity``) with stored factors: the steps run,
    ``refresh`` is never called."""
    basis = ProtocolEigh(every=None)
    params = _run(basis)
    assert basis.refreshes == [] and all(bool(torch.isfinite(p).all()) for p in params)


def test_a_basis_without_every_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"basis must be a basis refresher .* got WithoutEvery .*: it lacks every "):
        _preconditioner(WithoutEvery())


def test_identity_declares_that_it_never_refreshes():
    assert bases.Identity().every is None and isinstance(bases.Identity(), Basis)


class _Only:
    """An object with the given members (``None`` for an attribute, a no-op for a method)."""

    def __init__(self, protocol: type, drop: str) -> None:
        annotations = vars(protocol).get("__annotations__", {})
        for name in members(protocol):
            if name != drop:
                setattr(self, name, False if name in annotations else (lambda *args, **kwargs: None))


@pytest.mark.parametrize("protocol, slot", [(Structure, "structure"), (Estimator, "estimator"), (Basis, "basis"),
                                            (Applier, "applier")])
def test_each_declared_member_is_required_and_named_when_missing(protocol, slot):
    """Each protocol's every member, dropped in turn from an object that has all the others, is refused at
    construction with a message naming the slot and the missing member; with none dropped the object passes."""
    library = {"structure": structures.NMode(max_dim=8), "estimator": estimators.Shampoo(),
               "basis": bases.Eigh(every=EVERY), "applier": precond.Power(p=0.5)}
    for name in members(protocol):
        with pytest.raises(TypeError, match=rf"^{slot} must be .*: it lacks {name} \(precond\.parts\."):
            precond.Preconditioner(**{**library, slot: _Only(protocol, drop=name)})
    precond.Preconditioner(**{**library, slot: _Only(protocol, drop="")})


def test_the_protocols_declare_the_hooks_the_core_reads():
    """The members the core and ``DenseSpectrum`` read, once found with ``getattr(..., default)``, are declared."""
    assert {"plan", "blocks"} <= set(members(Structure))
    assert {"needs_whole_parameters", "rotated_moment"} <= set(members(Estimator))
    assert set(members(Basis)) == {"needs_factors", "every", "initialize", "refresh"}
    for part in (structures.Diagonal(), structures.Kronecker(), structures.LayerMatrix(), structures.Matrix(),
                 structures.NMode(), structures.OneSided()):
        assert isinstance(part, Structure)
