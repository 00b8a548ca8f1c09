"""The layering of ``docs/design.md`` ("Kernel and the import rule") holds in the code (issue 22).

Read statically from the source (``ast``), every ``import`` counted — at module level, inside functions and under
``TYPE_CHECKING`` alike, since each is a dependency of the module:

- the project's modules import each other without a cycle;
- a kernel module imports only kernel modules;
- a part package (``structures``, ``estimators``, ``bases``, ``precond.appliers``) imports only the kernel and itself.

And at run time: ``import estimators`` in a fresh process loads the kernel, the part packages and the
``Preconditioner`` (which ``import precond`` lists as a safe global), never the optimizer.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("precond", "structures", "estimators", "bases")

KERNEL = frozenset({
    "precond",  # the package itself: its public names are resolved lazily, by name (PEP 562)
    "precond.layout", "precond.contractions", "precond.state", "precond.parts", "precond.refresh", "precond.ema",
    "precond.fallbacks", "precond.validators", "precond.precision", "precond.checkpoint", "precond.reductions",
    "precond.safe_globals",
})
"""The kernel modules of ``docs/design.md``; everything else of ``precond`` composes the parts or drives them."""

PARTS = ("structures", "estimators", "bases", "precond.appliers")
"""The part packages: each imports only the kernel and its own package."""

def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` is, or lies in (``precond.layout.Layout`` → ``precond.layout``); None outside."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, source: str | None = None) -> set[str]:
    """The project modules ``module`` imports anywhere in its source (read from its file unless given)."""
    path = MODULES.get(module)
    package = module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.read_text(encoding="utf-8") if source is None else source
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(_resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from precond import layout` imports the module precond.layout
                full = f"{source}.{alias.name}"
                out.add(full if full in MODULES else _resolve(source))
    out.discard(None)
    out.discard(module)
    return out


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(frozenset(component))
    return found


def _part_of(module: str) -> str | None:
    return next((part for part in PARTS if module == part or module.startswith(part + ".")), None)


def test_the_graph_is_read():
    """The reader sees every kind of import (a guard against a test that passes by reading nothing)."""
    assert {"precond.layout", "precond.state"} <= GRAPH["precond.checkpoint"]
    assert "precond.preconditioner" in GRAPH["precond.blocking"]  # under TYPE_CHECKING
    source = ("from typing import TYPE_CHECKING\nimport precond.layout\nfrom . import ema\n"
              "from .state import ParamState\nif TYPE_CHECKING:\n    from precond.optimizer import Optimizer\n"
              "def f():\n    from precond import presets\n    import torch\n")
    assert _imports("precond.example", source) == {"precond.layout", "precond.ema", "precond.state",
                                                   "precond.optimizer", "precond.presets"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycles():
    cycles = [sorted(cycle) for cycle in _cycles(GRAPH)]
    assert not cycles, f"import cycles among the project's modules: {cycles}"


def test_the_kernel_modules_exist_and_are_named_in_the_design():
    assert KERNEL <= set(MODULES), sorted(KERNEL - set(MODULES))
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = design[design.index("## Kernel and the import rule"):]
    section = section[: section.index("\n## ", 1)]
    missing = [m for m in sorted(KERNEL - {"precond"}) if f"`{m.removeprefix('precond.')}`" not in section]
    assert not missing, f"docs/design.md's kernel list lacks {missing}"


def test_the_kernel_imports_nothing_above_it():
    above = {module: sorted(GRAPH[module] - KERNEL) for module in sorted(KERNEL)}
    assert not any(above.values()), {module: found for module, found in above.items() if found}


def test_a_part_package_imports_only_the_kernel_and_itself():
    wrong = {}
    for module in sorted(MODULES):
        part = _part_of(module)
        if part is not None:
            found = sorted(d for d in GRAPH[module] if d not in KERNEL and _part_of(d) != part)
            if found:
                wrong[module] = found
    assert not wrong, f"part modules importing outside the kernel and their own package: {wrong}"


def test_importing_estimators_loads_neither_the_optimizer_nor_what_drives_it():
    """A fresh process: ``import estimators`` runs ``precond/__init__`` (which lists the part classes and the
    ``Preconditioner`` as torch safe globals), and nothing else of ``precond``."""
    script = ("import sys\nimport estimators\n"
              f"print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r})))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "estimators.kfac" in loaded
    assert "precond.optimizer" not in loaded
    beyond = sorted(m for m in loaded if m not in KERNEL and _part_of(m) is None and m != "precond.preconditioner")
    assert not beyond, f"import estimators loaded {beyond}"
