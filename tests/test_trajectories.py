"""Refactors change no number: every preset replays the float64 trajectories recorded before the architecture
change bit for bit, and a checkpoint written by that earlier code loads and continues bit for bit."""

from __future__ import annotations

import pathlib

import pytest
import torch

from tests import trajectory_cases as cases

RECORDED = pathlib.Path(__file__).parent / "data" / "trajectories_v1.pt"


@pytest.fixture(scope="module")
def recorded():
    return torch.load(RECORDED, weights_only=False)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_identical(actual, expected, name):
    for step, (now, then) in enumerate(zip(actual, expected), start=1):
        for i, (a, b) in enumerate(zip(now, then)):
            assert torch.equal(a, b), f"{name}: parameter {i} differs at step {step} (max |Δ| {(a - b).abs().max():.3e})"


@pytest.mark.parametrize("name", [cases.case_name(c) for c in cases.cases()])
def test_trajectory_is_bit_identical_to_the_recorded_one(recorded, name):
    entry = recorded[name]
    actual = cases.run(entry["case"], range(1, cases.STEPS + 1))
    _assert_identical(actual, entry["trajectory"], name)


@pytest.mark.parametrize("name", [cases.case_name(c) for c in cases.cases()][::5])
def test_checkpoint_of_the_recorded_format_resumes_bit_identically(recorded, name):
    entry = recorded[name]
    params = [torch.nn.Parameter(p.clone()) for p in entry["checkpoint"]["params"]]
    optimizer = cases.make_optimizer(entry["case"], params)
    optimizer.load_state_dict(entry["checkpoint"]["optimizer"])
    actual = cases.run(entry["case"], range(cases.CHECKPOINT_AT + 1, cases.STEPS + 1), params, optimizer)
    _assert_identical(actual, entry["trajectory"][cases.CHECKPOINT_AT:], name)
