"""What a first install needs: numpy declared (torch warns "Failed to initialize NumPy" without it, and does not
declare it), and the README saying how to get torch's CPU build before ``pip install -e .``."""

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def _pyproject():
    if sys.version_info < (3, 11):
        tomllib = pytest.importorskip("tomli")
    else:
        import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_numpy_is_a_dependency():
    names = [re.split(r"[<>=!~;\[ ]", item, maxsplit=1)[0].lower() for item in _pyproject()["project"]["dependencies"]]
    assert "numpy" in names and "torch" in names


def test_readme_installs_the_cpu_torch_before_the_package():
    readme = (ROOT / "README.md").read_text()
    cpu = readme.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
    assert cpu < readme.index("pip install -e .", cpu)


def test_make_takes_torch_from_the_cpu_index():
    makefile = (ROOT / "Makefile").read_text()
    assert "TORCH_INDEX ?= https://download.pytorch.org/whl/cpu" in makefile
    assert '--extra-index-url "$(TORCH_INDEX)"' in makefile
    assert "--retries 0" in makefile  # an unreachable index must not stall an offline install
