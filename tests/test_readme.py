"""The README cannot rot: its Python blocks run, its quickstart trains, and it points only at what a clone contains.

Every ```` ```python ```` block of ``README.md`` runs, in order, in one namespace (a later block may use the
``model`` of the quickstart), on the CPU, in this process (about a second). A block that needs a CUDA device or a
distributed launch says so on its first line (``# readme-test: skip, <reason>``, ``tests/readme_blocks.py``) and is
skipped with that reason. The Python blocks of ``docs/*.md`` are compiled (they are written for a GPU or a launch and
are not run). Every relative Markdown link of the README and ``docs/``, and every repository path the README names
in backticks, must exist in the checkout.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from tests.readme_blocks import README, ROOT, python_blocks

BLOCKS = python_blocks()
DOCS = sorted((ROOT / "docs").glob("*.md"))

QUICKSTART_LINES = 15
COMPOSITION_LINES = 10
"""The issue's promise (issue 24): the first screen has a quickstart of at most 15 lines (a preset in a plain
training loop) and a composition of at most 10 (the four parts); they are the README's first two Python blocks."""


@pytest.fixture(scope="module")
def ran() -> dict[str, object]:
    """Run the README's blocks in order in one namespace; each block's exception (or None) and its output."""
    namespace: dict[str, object] = {"__name__": "readme"}
    outcome: dict[str, object] = {}
    torch.manual_seed(0)
    for block in BLOCKS:
        if block.skip_reason is not None:
            continue
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
        except Exception as error:  # reported by the block's own test
            outcome[block.name] = error
        else:
            outcome[block.name] = None
        outcome[block.name + ":stdout"] = out.getvalue()
        outcome[block.name + ":namespace"] = dict(namespace)
    return outcome


def _after(ran, block) -> dict[str, object]:
    """The namespace after ``block`` ran (an error of the block itself fails here, named)."""
    error = ran.get(block.name)
    if error is not None:
        raise AssertionError(f"the README's block at line {block.line} ({block.heading}) raised") from error
    return ran[block.name + ":namespace"]


def test_the_first_screen_has_a_quickstart_and_a_composition():
    assert len(BLOCKS) >= 2
    quickstart, composition = BLOCKS[0], BLOCKS[1]
    assert quickstart.lines <= QUICKSTART_LINES, f"the quickstart has {quickstart.lines} lines"
    assert composition.lines <= COMPOSITION_LINES, f"the composition has {composition.lines} lines"
    assert ".step()" in quickstart.code and "precond." in quickstart.code
    for part in ("structure=", "estimator=", "basis=", "applier=", "precond.Preconditioner", "precond.Optimizer"):
        assert part in composition.code
    assert quickstart.skip_reason is None and composition.skip_reason is None


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_readme_block_runs(ran, block):
    if block.skip_reason is not None:
        pytest.skip(f"README.md:{block.line}: {block.skip_reason}")
    _after(ran, block)


def test_the_quickstart_trains(ran):
    """The quickstart's model fits its linear teacher: the final loss is below 1 % of the targets' variance."""
    quickstart = BLOCKS[0]
    namespace = _after(ran, quickstart)
    loss, y = namespace["loss"], namespace["y"]
    assert torch.isfinite(loss)
    assert loss.item() < 0.01 * y.var().item(), f"loss {loss.item():.4g} against a target variance {y.var():.4g}"
    assert "loss after" in ran[quickstart.name + ":stdout"]


def test_the_composition_steps(ran):
    """The composed optimizer is a working ``torch.optim.Optimizer`` on the quickstart's model."""
    namespace = _after(ran, BLOCKS[1])
    model, opt, x, y = namespace["model"], namespace["opt"], namespace["x"], namespace["y"]
    assert isinstance(opt, torch.optim.Optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):  # the first step only fills the statistics
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("path", DOCS, ids=[path.name for path in DOCS])
def test_docs_python_blocks_compile(path):
    for block in python_blocks(path):
        compile(block.code, f"{path.name}:{block.line}", "exec")


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(r"`((?:docs|tests|examples|precond|structures|estimators|bases|ablations)/[\w./-]*\w)`")


@pytest.mark.parametrize("path", [README, *DOCS], ids=["README.md", *[path.name for path in DOCS]])
def test_relative_links_exist(path):
    """A clone contains what its documents link to (no shared folder, no file of another machine)."""
    text = path.read_text(encoding="utf-8")
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            missing.append(target)
    assert not missing, f"{path.name} links to paths this checkout lacks: {missing}"


def test_readme_names_only_paths_that_exist():
    text = README.read_text(encoding="utf-8")
    missing = sorted({p for p in _REPO_PATH.findall(text) if not (ROOT / p).exists()})
    assert not missing, f"README.md names paths this checkout lacks: {missing}"
    assert "shared folder" not in text and "ALGORITHMS.md" not in text


def test_readme_keeps_the_test_command():
    """CI runs the README's test command: ``make test`` (ruff and the CPU suite)."""
    text = README.read_text(encoding="utf-8")
    assert "```bash\nmake test\n```" in text
    assert text.index("make test") < text.index("## Quickstart")
