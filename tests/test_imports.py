"""No import cycles in nugget2d's packages, and every module imports on its own in a fresh interpreter.

The cycle check reads the sources (``ast``): an edge for every import of a nugget2d module, at module
level or inside a function, so a cycle hidden by a function-level import fails it too.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"compress": "nugget2d.compress", "runtime": "nugget2d.runtime", "serve": "nugget2d.serve"}
BENCH = ("bench_common", "bench_peers", "bench_quality", "bench_ruler", "bench_recall")


def modules() -> dict[str, Path]:
    """Every module of the three packages and their subpackages (``nugget2d.runtime`` for
    ``runtime/__init__.py``) and its file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The nugget2d modules ``name`` imports anywhere in its source (``from . import x`` counts ``x``)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {target for target in targets if target in known and target != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def fresh_import(*names: str) -> subprocess.CompletedProcess:
    """Import ``names`` in this order in a new interpreter."""
    code = "import importlib\n" + "".join(f"importlib.import_module({name!r})\n" for name in names)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_no_import_cycles():
    found = modules()
    graph = {name: imported(name, path, set(found)) for name, path in found.items()}
    assert graph["nugget2d.runtime.bench_quality"] >= {"nugget2d.runtime.bench_common", "nugget2d.runtime.bench_peers"}
    assert cycles(graph) == []


def test_cycle_detection_sees_function_level_imports(tmp_path):
    module = tmp_path / "a.py"
    module.write_text("def f():\n    from .b import g\n")
    assert imported("p.a", module, {"p.a", "p.b"}) == {"p.b"}
    assert cycles({"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": set()}) == [["p.a", "p.b"]]


def test_bench_modules_import_only_at_top_level():
    for stem in BENCH:
        tree = ast.parse((ROOT / "runtime" / f"{stem}.py").read_text())
        top = set(map(id, tree.body))
        late = [
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.level or (node.module or "").startswith("nugget2d"))
            and id(node) not in top
        ]
        assert late == [], f"{stem}: function-level imports of nugget2d modules {late}"


@pytest.mark.slow
def test_bench_modules_import_in_every_order():
    for order in itertools.permutations(f"nugget2d.runtime.{stem}" for stem in BENCH[:3]):
        result = fresh_import(*order)
        assert result.returncode == 0, f"{order}:\n{result.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports_first(name):
    result = fresh_import(name)
    assert result.returncode == 0, result.stderr[-2000:]
