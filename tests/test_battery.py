"""One battery over the registry (``tests/registry.py``: every exported preset and part) and every mode the CPU
can run (``tests/battery_modes.py``), as PyTorch's ``optim_db`` tests and optax's list of optimizers under test.

For each (entry, mode) the compatibility table (``precond.compatibility``) is read first: a combination it refuses
must be refused at construction with the table's message; every other combination is run and held to its mode's
promise against the entry's reference run (bitwise, or to the entry's derived round-off tolerance,
``tests/battery_runs.py``). The distributed modes run in one spawned group of 2 gloo ranks. Then each entry's life:
parameters without a gradient, ``state_dict`` resume (also with asynchronous refreshes pending),
``torch.load(weights_only=True)``, ``copy.deepcopy``, pickle, a refused NaN gradient, and asynchronous refreshes
that really wait for the next step on CPU.
"""

from __future__ import annotations

import pytest
import torch

import precond
from precond import compatibility
from tests import battery_lifecycle as life
from tests import registry
from tests.battery_modes import BY_NAME, MODES, Mode
from tests.battery_problem import make_model, parameters
from tests.battery_runs import (
    build,
    final,
    largest_differences,
    replayed,
    sensitivity,
    tolerance,
    uncut,
    verdict,
    well_conditioned,
)
from tests.battery_workers import key
from tests.distributed_harness import spawn

ENTRIES = [entry.name for entry in registry.entries()]
SINGLE = [mode.name for mode in MODES if mode.ranks == 1]
DISTRIBUTED = [mode.name for mode in MODES if mode.ranks == 2]
LIFECYCLE = {
    "partial": lambda e: life.check_partial(e, BY_NAME["plain"]),
    "state_dict": lambda e: life.check_state_dict(e, BY_NAME["plain"]),
    "state_dict_async": lambda e: life.check_state_dict(e, BY_NAME["async"]),
    "weights_only": lambda e: life.check_weights_only(e, BY_NAME["plain"]),
    "deepcopy": lambda e: life.check_copy(e, BY_NAME["plain"], "deepcopy"),
    "pickle": lambda e: life.check_copy(e, BY_NAME["plain"], "pickle"),
    "bad_input": lambda e: life.check_bad_input(e, BY_NAME["plain"]),
    "async_defers": lambda e: life.check_async_defers(e, BY_NAME["async_unstaggered"]),
}


def test_registry_covers_every_export():
    """A preset or part that is exported enters the battery; one the registry cannot build fails here."""
    missing = registry.missing()
    assert not missing, (f"exported but not in the battery's registry: {missing}; add a recipe (how to construct "
                         "it on small parameters) to PART_RECIPES in tests/registry.py, or to NOT_PARTS with the "
                         "reason it is no part")
    presets = {f"preset.{name}" for name in (*precond.PRESETS, *precond.MODEL_PRESETS)}
    parts = set(registry.exported_parts()) - set(registry.NOT_PARTS)
    assert set(ENTRIES) == presets | parts
    stale = (set(registry.PART_RECIPES) | set(registry.NOT_PARTS)) - set(registry.exported_parts())
    assert not stale, f"recipes of names that are no longer exported: {sorted(stale)}"


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_is_well_conditioned(entry):
    """The round-off tolerance (16 × the response to one round-off of every gradient entry) is far below a real
    change of the updates (10⁻⁶ of a step), so the round-off comparisons mean something."""
    assert well_conditioned(entry), (f"{entry}: one unit of round-off in the gradients moves the parameters by "
                                     f"{sensitivity(entry):.2e} after the battery's steps")


def _check_refused(entry: registry.Entry, mode: Mode, rule: compatibility.Rule) -> None:
    """Construction raises the table's rule, with its message."""
    with pytest.raises(compatibility.Incompatible) as refused:
        build(entry, make_model(), mode)
    assert refused.value.rule is rule, f"refused by {refused.value.rule.name}, the table says {rule.name}"
    message = str(refused.value)
    assert rule.remedy.split("{")[0] in message and rule.reason.split("{")[0] in message, message


def _check_run(entry: registry.Entry, mode: Mode, run: dict[str, torch.Tensor]) -> None:
    """Finite, moved, and (if the mode promises it) equal to the reference run."""
    init = parameters(make_model())
    bad = [name for name, value in run.items() if not torch.isfinite(value).all()]
    assert not bad, f"non-finite parameters {bad}"
    still = [name for name, value in run.items() if torch.equal(value, init[name])]
    assert not still, f"parameters that never moved: {still}"
    if mode.promise is None:
        return
    reference = final(entry.name, mode.reference)
    if mode.blocks:  # the uncut parameters, compared on the same gradients (the cut ones change the others')
        run, reference = replayed(entry.name, mode.name, mode.reference)
    differences = largest_differences(run, reference, uncut(entry, mode))
    limit = 0.0 if mode.promise == "bitwise" else tolerance(entry.name)
    wrong = {name: d for name, d in differences.items() if not d <= limit}
    assert not wrong, f"{mode.promise} promise broken against {mode.reference} (tolerance {limit:.1e}): {wrong}"


def _check(entry_name: str, mode_name: str, run_of) -> None:
    entry, mode = registry.entry(entry_name), BY_NAME[mode_name]
    kind, detail = verdict(entry_name, mode_name)
    if kind == "not offered":
        assert detail  # the registry says why this entry has no such mode
    elif kind == "refused":
        _check_refused(entry, mode, detail)
    else:
        _check_run(entry, mode, run_of(entry_name, mode_name))


@pytest.mark.parametrize("mode", SINGLE)
@pytest.mark.parametrize("entry", ENTRIES)
def test_mode(entry, mode):
    _check(entry, mode, final)


@pytest.fixture(scope="module")
def ranks():
    """One group of 2 gloo ranks runs every allowed distributed pair; the results of rank 0 and rank 1."""
    pairs = [(e, m) for e in ENTRIES for m in DISTRIBUTED if verdict(e, m)[0] == "runs"]
    return spawn(2, "tests.battery_workers", "battery", pairs, timeout=240.0)


@pytest.mark.parametrize("mode", DISTRIBUTED)
@pytest.mark.parametrize("entry", ENTRIES)
def test_distributed_mode(entry, mode, request):
    def run_of(entry_name: str, mode_name: str) -> dict[str, torch.Tensor]:
        results = request.getfixturevalue("ranks")
        runs = [result[key(entry_name, mode_name)] for result in results]
        for rank, run in enumerate(runs):
            assert "error" not in run, f"rank {rank} raised:\n{run['error']}"
        for name, value in runs[1].items():
            assert torch.equal(value, runs[0][name]), f"ranks 0 and 1 differ in {name}"
        return runs[0]

    _check(entry, mode, run_of)


@pytest.mark.parametrize("check", list(LIFECYCLE))
@pytest.mark.parametrize("entry", ENTRIES)
def test_lifecycle(entry, check):
    LIFECYCLE[check](registry.entry(entry))
