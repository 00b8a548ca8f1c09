"""Refactors change no number: every preset replays its recorded float64 trajectories bit for bit, and a
checkpoint written by the code before the architecture change still loads and continues.

``trajectories_v1.pt`` was recorded before the architecture change (commit 0f9f3d9's code); the refactor replayed
it bit for bit (commit bc1a6cf). The update was then deliberately changed to form ``η·U`` in the state dtype before
casting (float16 weights, one path for float and tensor ``lr``), which moves float64 results by round-off, so
``trajectories_v2.pt`` is the reference for later refactors; v1's mid-run checkpoints (the old format) must still
load and continue to round-off of the v1 trajectory."""

from __future__ import annotations

import pathlib

import pytest
import torch

from tests import trajectory_cases as cases

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DATA / "trajectories_v2.pt", weights_only=False)


@pytest.fixture(scope="module")
def recorded_before_the_refactor():
    return torch.load(DATA / "trajectories_v1.pt", weights_only=False)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_identical(actual, expected, name, tolerance=0.0):
    for step, (now, then) in enumerate(zip(actual, expected), start=1):
        for i, (a, b) in enumerate(zip(now, then)):
            close = torch.equal(a, b) if tolerance == 0 else torch.allclose(a, b, rtol=tolerance, atol=tolerance)
            assert close, f"{name}: parameter {i} differs at step {step} (max |Δ| {(a - b).abs().max():.3e})"


@pytest.mark.parametrize("name", [cases.case_name(c) for c in cases.cases()])
def test_trajectory_is_bit_identical_to_the_recorded_one(recorded, name):
    entry = recorded[name]
    actual = cases.run(entry["case"], range(1, cases.STEPS + 1))
    _assert_identical(actual, entry["trajectory"], name)


@pytest.mark.parametrize("name", [cases.case_name(c) for c in cases.cases()][::5])
def test_checkpoint_of_the_recorded_format_resumes_bit_identically(recorded, name):
    _resume(recorded[name], name, tolerance=0.0)


@pytest.mark.parametrize("name", [cases.case_name(c) for c in cases.cases()][::5])
def test_checkpoint_written_before_the_refactor_still_loads_and_continues(recorded_before_the_refactor, name):
    _resume(recorded_before_the_refactor[name], name, tolerance=1e-10)


def _resume(entry, name, tolerance):
    params = [torch.nn.Parameter(p.clone()) for p in entry["checkpoint"]["params"]]
    optimizer = cases.make_optimizer(entry["case"], params)
    optimizer.load_state_dict(entry["checkpoint"]["optimizer"])
    actual = cases.run(entry["case"], range(cases.CHECKPOINT_AT + 1, cases.STEPS + 1), params, optimizer)
    _assert_identical(actual, entry["trajectory"][cases.CHECKPOINT_AT:], name, tolerance)
