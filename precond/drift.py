"""Refreshing a basis only when it has drifted from its factor's eigenbasis (``drift_tolerance``).

At each due refresh of a unit (mode ``k`` of one parameter, on the fixed or staggered schedule of period ``T``), the
refresh runs only if the basis has drifted: if the relative off-diagonal energy of ``A = Q_kᵀ S_k Q_k``,

    r_k = ‖A − diag(A)‖_F / ‖A‖_F = √(1 − ‖diag(A)‖² / ‖S_k‖_F²)      (``Q_k`` orthogonal: ``‖A‖_F = ‖S_k‖_F``),

is at least the tolerance ``τ``; otherwise ``Q_k`` is kept until the next due point. ``r_k = 0`` exactly when ``Q_k``
diagonalises ``S_k``. The rule is Eschenhagen et al. 2025 ("Purifying Shampoo": skip the eigenbasis
computation while the relative off-diagonal Frobenius norm of ``QᵀSQ`` is below a tolerance); NVIDIA's
Emerging-Optimizers SOAP (``adaptive_update_tolerance``) and Meta's QR eigendecomposition apply the same idea. It only
removes refreshes: ``T`` is now the period at which a unit is *checked*, and with :class:`RefreshSchedule`'s stagger
no step pays more than its share of the fixed schedule.

What it adds to them: the check costs one ``d³`` product (``S_k Q_k``, in full float32, the same as the first product
of a QR power step), no eigendecomposition and no host synchronisation — and no product at all with an estimator
that keeps ``diag(Q_kᵀ S_k Q_k)`` current (``estimators.KL(track_drift=True)``: its λ update forms
``diag(Q_kᵀ Δ_k Q_k)`` anyway), where ``r_k = √(1 − ‖diag‖² / ‖S_k‖_F²)`` is one ``d²`` reduction
(:func:`ratio_from_diagonal`). A unit due at step ``t`` is measured from the
state *before step t's fold* — at the end of step ``t − 1`` (after that step's own refreshes; the host reads the
result one step later, long done, from pinned memory) — or, where that measurement is missing (the first step, after
``load_state_dict``, a refresh period of 1), at the start of step ``t``, from the same state: so a resumed run makes
the same decisions as an uninterrupted one, without saving anything. Reading the verdict there waits for the device.

A refresh budget (``refresh_budget=B``) caps the refreshes of each ``step()`` at ``W = Σ_units d_k³ / B``, the work
a fixed schedule of period ``B`` spreads on each step (the cost model of the stagger, :class:`RefreshSchedule`):
the units due in this step whose ``r_k ≥ τ`` are granted in decreasing ``r_k`` (a non-finite ``r_k`` first) while
their ``d_k³`` still fits in ``W``; the most drifted is granted even alone above ``W``, so no step pays more than
``max(W, max_k d_k³)``. A unit passed over is checked again at its next due point. With a short period ``T`` (e.g.
2) and a free check (``track_drift``), the bases are checked often and refreshed where they drifted most, at a fixed
schedule's cost per step. The ranking reads every due unit's ``r_k`` at the step's first decision, so every unit
due in a ``step()`` is measured before any bucket is stepped (the engine); the grants depend only on the measured
``r_k`` and the shapes, so a resumed run makes the same ones.

Counts per unit (checks and refreshes made) are kept on the host: ``optimizer.refresh_counts()``; the totals are in
``optimizer.stats()`` (``drift_checks``, ``drift_refreshes``, and ``drift_deferred``: drifted units the budget
passed over).
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Hashable, Optional, Sequence

import attrs
import torch

from precond.precision import full_precision
from precond.refresh import rayleigh_quotients


def offdiagonal_ratio(factor: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``r = ‖A − diag(A)‖_F / ‖A‖_F`` of ``A = Qᵀ S Q`` for each batch entry (``(B, d, d)`` → ``(B,)``), from
    ``diag(A)`` (one product) and ``‖S‖_F`` (module docstring; exact for an orthogonal ``Q``, whose rounding
    ``‖QᵀQ − I‖`` adds about its size to ``r²``). Computed in ``factor``'s dtype (at least float32), TF32 off; a
    zero factor counts as diagonal (``r = 0``)."""
    dtype = _dtype(factor)
    s, q = factor.to(dtype), basis.to(dtype)
    with full_precision():
        diagonal = rayleigh_quotients(s, q)
    return ratio_from_diagonal(s, diagonal)


def ratio_from_diagonal(factor: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """``r = √(1 − ‖diag(A)‖² / ‖S‖_F²)`` from ``S`` (``(B, d, d)``) and ``diag(A) = diag(Qᵀ S Q)`` (``(B, d)``,
    e.g. the one ``KL(track_drift=True)`` keeps): one ``d²`` reduction, no product. ``r = 0`` for a zero factor."""
    dtype = _dtype(factor)
    s, diagonal = factor.to(dtype), diagonal.to(dtype)
    total = torch.linalg.matrix_norm(s).square()
    off = (total - diagonal.square().sum(dim=-1)).clamp_min(0.0)
    return torch.where(total > 0, off / total.clamp_min(torch.finfo(dtype).tiny), 0.0).sqrt()


def _dtype(factor: torch.Tensor) -> torch.dtype:
    return torch.float64 if factor.dtype == torch.float64 else torch.float32


@attrs.define(eq=False)
class _Measured:
    step: int
    ratios: torch.Tensor  # on the host: one entry per measured unit
    position: int
    done: Optional[torch.cuda.Event]


Units = Callable[[], Sequence[tuple[Hashable, int, int]]]
"""The refresh units ``(key, d_k, T)`` of the optimizer (``precond.engine.Engine.refresh_units``)."""


class DriftMonitor:
    """The measured ``r_k`` of the units due next, read on the host without a synchronisation, the grants of the
    refresh budget, and the counts of checks and refreshes per unit (module docstring)."""

    def __init__(self, tolerance: float, budget: Optional[int] = None, units: Optional[Units] = None) -> None:
        self.tolerance = tolerance
        self.budget = budget
        self._units = units
        self._work: Optional[dict[Hashable, int]] = None  # d_k³ per unit (budget), made again when units change
        self._granted: Optional[set[Hashable]] = None  # this step()'s grants, made at its first decision (budget)
        self._candidates: dict[Hashable, _Measured] = {}  # this step()'s due units, measured before any bucket ran
        self._measured: dict[Hashable, _Measured] = {}
        self.checks: collections.Counter[Hashable] = collections.Counter()
        self.refreshes: collections.Counter[Hashable] = collections.Counter()
        self.deferred: collections.Counter[Hashable] = collections.Counter()

    def begin(self, due: Sequence[Hashable]) -> None:
        """A ``step()`` whose due units ``due`` are all measured now (by the engine, before any bucket is stepped):
        they are the candidates the budget ranks at its first decision. A unit decided in this step() that is not
        one of them (a new parameter's first step) is not ranked: it is refreshed if it drifted."""
        self._granted = None
        self._candidates = {key: self._measured[key] for key in due} if self.budget is not None else {}

    def units_changed(self) -> None:
        """Parameters were added: the work per unit is listed again at the next grant."""
        self._work = None

    def has(self, key: Hashable, step: int) -> bool:
        """Whether unit ``key`` was measured for its refresh due at ``step``."""
        measured = self._measured.get(key)
        return measured is not None and measured.step == step

    def measure(self, keys: Sequence[Hashable], step: int, factor: torch.Tensor, basis: torch.Tensor,
                diagonal: Optional[torch.Tensor] = None) -> None:
        """Measure ``r`` of the units ``keys`` (batch entries of ``factor`` and ``basis``) for their refresh due at
        ``step``: from the estimator's tracked ``diagonal = diag(Qᵀ S Q)`` when it keeps one (no product), else by
        forming it; on CUDA the result is copied to pinned host memory behind the work already queued."""
        if diagonal is not None:
            ratios = ratio_from_diagonal(factor, diagonal).float()
        else:
            ratios = offdiagonal_ratio(factor, basis).float()
        done = None
        if ratios.is_cuda:
            host = torch.empty(ratios.shape, dtype=ratios.dtype, pin_memory=True)
            host.copy_(ratios, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(ratios.device))
            ratios = host
        for position, key in enumerate(keys):
            self._measured[key] = _Measured(step, ratios, position, done)

    def select(self, keys: Sequence[Hashable], due: Sequence[int], step: int) -> list[int]:
        """The positions among ``due`` (indices into ``keys``) whose basis has drifted (``r ≥ τ``, or ``r`` not
        finite) and is refreshed now; counts the checks and refreshes. Every due unit must have been measured."""
        if self.budget is not None and self._granted is None:
            self._granted = self._grant()
        kept = []
        for i in due:
            measured = self._measured.pop(keys[i])
            if measured.step != step:
                raise RuntimeError(f"precond: the drift of refresh unit {keys[i]} was measured for step "
                                   f"{measured.step}, not {step} (a bug: please report it)")
            self.checks[keys[i]] += 1
            if self._drifted(measured):
                if keys[i] in self._candidates and keys[i] not in self._granted:
                    self.deferred[keys[i]] += 1
                    continue
                self.refreshes[keys[i]] += 1
                kept.append(i)
        return kept

    @staticmethod
    def _ratio(measured: _Measured) -> float:
        if measured.done is not None:
            measured.done.synchronize()  # finished a step ago: no wait in the steady state
        return float(measured.ratios[measured.position])

    def _drifted(self, measured: _Measured) -> bool:
        return not self._ratio(measured) < self.tolerance  # NaN refreshes: a broken basis must not be kept

    def _grant(self) -> set[Hashable]:
        """The units of this step() the budget refreshes: every measured unit that drifted, in decreasing ``r``
        (non-finite first, then the order of measurement), while its ``d³`` fits in ``W``; the first one always."""
        if self._work is None:
            self._work = {key: d**3 for key, d, _ in self._units()}
        allowance = sum(self._work.values()) / self.budget
        drifted = [(key, self._ratio(m)) for key, m in self._candidates.items() if self._drifted(m)]
        drifted.sort(key=lambda item: -math.inf if not math.isfinite(item[1]) else -item[1])  # stable: ties keep order
        granted: set[Hashable] = set()
        spent = 0
        for key, _ in drifted:
            work = self._work.get(key, 0)
            if not granted or spent + work <= allowance:
                granted.add(key)
                spent += work
        return granted

    def forget(self) -> None:
        """Drop every measurement (the state was replaced: ``load_state_dict``); counts stay."""
        self._measured.clear()
        self._candidates.clear()

    def totals(self) -> dict[str, int]:
        return {"drift_checks": sum(self.checks.values()), "drift_refreshes": sum(self.refreshes.values()),
                "drift_deferred": sum(self.deferred.values())}
