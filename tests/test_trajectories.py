"""Refactors change no number: every preset replays its recorded float64 trajectories, and checkpoints written by
earlier code still load and continue.

**Where bit-identity is demanded.** ``trajectories_v3.pt`` holds the fingerprint of the machine that recorded it
(CPU model, BLAS and LAPACK build, torch version, thread count, BLAS code-path variables: ``tests/fingerprint.py``).
On that machine the replay must be bit-identical: that is the proof that a refactor changed no operation. On any
other machine (another CPU, BLAS or torch orders the sums of a product differently) it must agree to
:func:`tolerance`, derived here from float64 round-off:

- each step rounds ``θ ← θ − η U`` once, an error of at most ½ ulp of ``θ``, i.e. ``ε|θ|/2`` with ``ε = 2⁻⁵²``;
- the update's own round-off (a different machine's ``eigh``, QR and products) is some ``c ε`` relative to
  ``|U|`` and enters ``θ`` multiplied by ``η ≤ 10⁻³``; it then propagates through later steps with the case's
  amplification ``A`` (the relative change of the trajectory per relative change of the gradients, measured by
  :func:`test_recorded_cases_are_well_conditioned` and required to stay below :data:`MAX_AMPLIFICATION`);
- so after ``n`` steps ``|Δθ| ≤ n ε |θ|/2 + A η |U| c ε``. With ``|U| ≲ 10|θ|`` (normalised updates of O(1)
  parameters) and ``c ≤ 10³`` this is at most ``(n/2 + 10) ε |θ|``; the tolerance takes ``4 n ε max(1, |θ|∞)``,
  which is above that bound for the recorded ``n = 12`` (about ``4·10⁻¹⁴`` here). A genuine change of one update
  by 10⁻¹² exceeds it more than tenfold (:func:`test_the_tolerance_catches_a_change_of_one_update`).

A case whose trajectory is sensitive to round-off (a rank-deficient first factor whose null space is split by
round-off, a bfloat16 iteration) would prove nothing across machines: the conditioning test bounds every
recorded case's amplification.

``trajectories_v1.pt`` was recorded before the first architecture change (commit 0f9f3d9's code; old checkpoint
format); ``trajectories_v2.pt`` after the update was changed to form ``η·U`` in the state dtype (on a machine whose
fingerprint was not kept, so it is replayed at the tolerance). Their mid-run checkpoints must still load and continue
to round-off.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import torch

from tests import trajectory_cases as cases
from tests.fingerprint import fingerprint

DATA = pathlib.Path(__file__).parent / "data"
EPS = torch.finfo(torch.float64).eps
MAX_AMPLIFICATION = 1e3
"""Bound on a recorded case's amplification ``A`` (measured: 2 to 80)."""
NAMES = [cases.case_name(c) for c in cases.cases()]


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DATA / "trajectories_v3.pt", weights_only=False)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tolerance(trajectory: list[list[torch.Tensor]]) -> float:
    """``4 n ε max(1, |θ|∞)`` over a trajectory of ``n`` steps (derivation in the module docstring)."""
    largest = max(p.abs().max().item() for params in trajectory for p in params)
    return 4 * len(trajectory) * EPS * max(1.0, largest)


def same_machine(recorded: dict[str, Any]) -> bool:
    return recorded["fingerprint"] == fingerprint()


def mismatch(actual, expected, exact: bool) -> str | None:
    """Where ``actual`` first differs from ``expected`` (bitwise, or beyond :func:`tolerance`), else None."""
    allowed = 0.0 if exact else tolerance(expected)
    for step, (now, then) in enumerate(zip(actual, expected, strict=True), start=1):
        for i, (a, b) in enumerate(zip(now, then, strict=True)):
            worst = (a - b).abs().max().item()
            if (exact and not torch.equal(a, b)) or worst > allowed:
                return f"parameter {i} differs at step {step} by {worst:.3e} (allowed {allowed:.1e})"
    return None


def _check(actual, expected, name: str, exact: bool) -> None:
    where = mismatch(actual, expected, exact)
    assert where is None, f"{name}: {where}" + ("" if exact else " on a machine other than the recording one")


@pytest.mark.parametrize("name", NAMES)
def test_trajectory_replays_the_recorded_one(recorded, name):
    entry = recorded["cases"][name]
    actual = cases.run(entry["case"], range(1, cases.STEPS + 1))
    _check(actual, entry["trajectory"], name, exact=same_machine(recorded))


@pytest.mark.parametrize("name", NAMES[::5])
def test_checkpoint_of_the_recorded_format_resumes(recorded, name):
    entry = recorded["cases"][name]
    actual = cases.resumed(entry["case"], entry["checkpoint"])
    _check(actual, entry["trajectory"][cases.CHECKPOINT_AT:], name, exact=same_machine(recorded))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_checkpoints_written_by_earlier_code_still_load_and_continue(version):
    """Built as the code of that time built them (``floor=0`` for the presets that have the round-off floor
    since), the checkpoints load and continue; built with today's defaults, they are refused with the field named."""
    recorded = torch.load(DATA / f"trajectories_{version}.pt", weights_only=False)
    for name in [n for n in NAMES if n in recorded][::5]:
        entry = recorded[name]
        actual = cases.resumed(cases.before_the_floor(entry["case"]), entry["checkpoint"])
        expected = entry["trajectory"][cases.CHECKPOINT_AT:]
        if version == "v1":  # v1 → v2 changed the update's rounding deliberately (module docstring)
            assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for now, then in zip(actual, expected, strict=True)
                       for a, b in zip(now, then, strict=True)), name
        else:
            _check(actual, expected, name, exact=False)
        if entry["case"]["preset"] in cases.FLOORED:
            with pytest.raises(ValueError, match=r"applier(\.inner)?\.floor: saved 0\.0 \(the checkpoint predates"):
                cases.resumed(entry["case"], entry["checkpoint"])


def test_trajectories_recorded_before_this_format_replay_to_round_off():
    """The v2 goldens (no fingerprint) are replayed by today's code within the tolerance: the code changed nothing
    since they were recorded beyond a machine's round-off (but the round-off floor, off for this replay)."""
    recorded = torch.load(DATA / "trajectories_v2.pt", weights_only=False)
    for name in NAMES[::3]:
        if name in recorded:
            actual = cases.run(cases.before_the_floor(recorded[name]["case"]), range(1, cases.STEPS + 1))
            _check(actual, recorded[name]["trajectory"], name, exact=False)


def test_the_tolerance_catches_a_change_of_one_update(recorded):
    """A deliberate change of 10⁻¹² in one entry of one update (step 3), carried through the later steps, fails the
    cross-machine comparison of every recorded case: the tolerance cannot hide a real change of that size."""
    def change_one_update(problem, step):
        if step == 3:
            with torch.no_grad():
                problem.params[-1].view(-1)[0] -= 1e-12

    for name in NAMES:
        entry = recorded["cases"][name]
        changed = cases.run(entry["case"], range(1, cases.STEPS + 1), after_step=change_one_update)
        assert mismatch(changed, entry["trajectory"], exact=False) is not None, name


def test_recorded_cases_are_well_conditioned():
    """Every recorded case's trajectory moves by at most ``A·δ·η`` when its gradients are perturbed by a relative
    ``δ = 10⁻¹²``, with ``A ≤`` :data:`MAX_AMPLIFICATION` (a round-off-sensitive case would move by orders of
    magnitude more: its null space is split by round-off)."""
    delta = 1e-12
    for case in cases.cases()[::2]:
        base = cases.run(case, range(1, cases.STEPS + 1))

        def perturb(problem, step):
            gen = torch.Generator().manual_seed(7 + step)
            for p in problem.params:
                if p.grad is not None:
                    p.grad.mul_(1 + delta * torch.randn(p.grad.shape, generator=gen, dtype=p.grad.dtype))

        moved = cases.run(case, range(1, cases.STEPS + 1), after_gradients=perturb)
        change = max((a - b).abs().max().item()
                     for now, then in zip(moved, base, strict=True) for a, b in zip(now, then, strict=True))
        amplification = change / (delta * cases.LR)
        assert amplification < MAX_AMPLIFICATION, f"{cases.case_name(case)}: amplification {amplification:.2e}"
        assert change > 0, f"{cases.case_name(case)}: the perturbation did not reach the trajectory"
