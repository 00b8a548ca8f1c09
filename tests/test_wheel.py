"""The package as an index would ship it (marked slow: about half a minute).

From a copy of the checkout's files (git's tracked and untracked-but-not-ignored files, so nothing built in place
leaks in), setuptools' PEP 517 hook builds an sdist (what ``python -m build`` does first); ``pip wheel`` builds the
wheel from that sdist, so a file the sdist forgets fails here. The wheel must carry the four packages with their
``py.typed`` markers, the license and the metadata (version, SPDX license, classifiers). It is installed into a
clean virtual environment, and the README's quickstart and composition run there, against the installed package.

Nothing is downloaded: the build uses this interpreter's setuptools (``--no-build-isolation``), and the new
environment sees torch and the other dependencies through a ``.pth`` file naming this interpreter's site-packages
(``venv --system-site-packages`` alone would see the base interpreter's, which need not have torch). A ``.pth``
line adds a directory without running the ``.pth`` files inside it, so the editable install of the checkout is
not visible there; the test asserts that ``precond`` is imported from the new environment.
"""

from __future__ import annotations

import email.parser
import os
import pathlib
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

from tests.readme_blocks import ROOT, python_blocks

pytestmark = pytest.mark.slow

PACKAGES = ("precond", "structures", "estimators", "bases")
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
                                 ".hypothesis", "results", ".devrun", ".whl", ".bench_old")


def _run(command: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _copy_checkout(dest: pathlib.Path) -> None:
    """The files a clone would have, plus untracked files not ignored (the working tree under test)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): copy the tree without build leftovers
        shutil.copytree(ROOT, dest, ignore=IGNORED)
        return
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    work = tmp_path_factory.mktemp("wheel")
    source, dist = work / "source", work / "dist"
    source.mkdir()
    dist.mkdir()
    _copy_checkout(source)
    sdist_name = _run([sys.executable, "-c", "import sys\nfrom setuptools import build_meta\n"
                       "print(build_meta.build_sdist(sys.argv[1]))", str(dist)], cwd=source).strip().splitlines()[-1]
    sdist = dist / sdist_name
    assert sdist.exists(), sdist_name
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(sdist)], cwd=work)
    wheels = list(dist.glob("precond-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_sdist_and_wheel_carry_the_packages_types_license_and_metadata(wheel):
    sdists = list(wheel.parent.glob("precond-*.tar.gz"))
    assert len(sdists) == 1
    with tarfile.open(sdists[0]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"pyproject.toml", "README.md", "LICENSE"} <= names
    assert all(f"{package}/py.typed" in names for package in PACKAGES)

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
    assert {name.split("/")[0] for name in names} == {*PACKAGES, info}  # no tests, docs or examples
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names and f"{package}/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["Name"] == "precond" and metadata["Version"]
    assert metadata["License-Expression"] == "MIT"
    classifiers = metadata.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and any(c.startswith("Programming Language :: Python :: 3") for c in
                                                    classifiers)
    requires = " ".join(metadata.get_all("Requires-Dist") or [])
    for dependency in ("torch", "numpy", "einops", "opt_einsum", "attrs"):
        assert dependency in requires


def test_wheel_installs_into_a_clean_venv_and_runs_the_quickstart(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], cwd=tmp_path)
    python = env_dir / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp_path).strip()
    ours = [path for path in site.getsitepackages() if pathlib.Path(path).is_dir()]
    (pathlib.Path(purelib) / "_precond_test_dependencies.pth").write_text("\n".join(ours) + "\n")

    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    clean["OMP_NUM_THREADS"] = "1"
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path, env=clean)

    blocks = python_blocks()
    quickstart, composition = blocks[0].code, blocks[1].code
    check = textwrap.dedent("""
        import importlib.metadata, pathlib, sys
        from packaging.requirements import Requirement
        for line in importlib.metadata.requires("precond"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                assert requirement.specifier.contains(importlib.metadata.version(requirement.name),
                                                      prereleases=True), line
        import precond, structures, estimators, bases
        for module in (precond, structures, estimators, bases):
            assert pathlib.Path(module.__file__).is_relative_to(sys.prefix), module.__file__
        print("installed from", pathlib.Path(precond.__file__).parent)
    """)
    script = tmp_path / "quickstart.py"
    script.write_text(check + "\n" + quickstart + "\n" + composition + "\nopt.step()\n")
    out = _run([str(python), "-I", str(script)], cwd=tmp_path, env=clean)
    assert "installed from" in out and "loss after 200 steps" in out
