"""The examples run as documented (they would silently rot otherwise)."""

import pathlib
import runpy

import pytest

INTEGRATIONS = {"hf_trainer.py", "lightning.py"}  # optional dependencies: tests/test_integrations.py (slow)
EXAMPLES = sorted(
    p for p in (pathlib.Path(__file__).parent.parent / "examples").glob("*.py") if p.name not in INTEGRATIONS
)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    lines = [line for line in capsys.readouterr().out.splitlines() if "loss" in line]
    first, last = float(lines[0].split()[-1]), float(lines[-1].split()[-1])
    assert last < 0.5 * first
