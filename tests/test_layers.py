"""The layer rule, read from the code: every import (at module level, inside functions, under
TYPE_CHECKING) runs downwards, and no folder holds a circle of imports.

Layers, lowest first: the core (``anomalyclaw/``: types, config, images, caches), then
``experts/`` and ``prompts/`` (beside each other), ``tools/``, ``graph/``, ``eval/``. Only the
command line (``anomalyclaw/cli.py``) and the façade (``anomalyclaw/__init__.py``) may import
upwards. Each folder's package-dir mapping is read from ``pyproject.toml``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Rank of each part; a module may import parts of a lower rank, and its own part.
RANKS = {"core": 0, "experts": 1, "prompts": 1, "tools": 2, "graph": 3, "eval": 4, "top": 5}
#: Modules of the core package that may import any part (they sit above everything).
#: (``anomalyclaw.studio`` is the LangGraph Studio entry point: like the command line, it wires
#: the graphs to the data layer.)
TOP = {"anomalyclaw", "anomalyclaw.cli", "anomalyclaw.__main__", "anomalyclaw.studio"}


def package_dirs() -> dict[str, Path]:
    """``{"anomalyclaw.graph": REPO/"graph", ...}`` from pyproject's package-dir table."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    table = re.search(r"^\[tool\.setuptools\.package-dir\]\s*\n(.*?)(?:^\[|\Z)", text, re.S | re.M)
    assert table, "pyproject.toml has no [tool.setuptools.package-dir] table"
    return {k: REPO / v for k, v in re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', table.group(1), re.M)}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``pkg.__init__`` is named ``pkg``)."""
    out: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            sub = [p for p in path.relative_to(folder).parts[:-1]]
            if any(p.startswith(".") or p == "__pycache__" for p in sub):
                continue
            name = ".".join([package, *parts])
            # The core folder also holds the other parts' names only through the mapping.
            if package == "anomalyclaw" and parts and parts[0] in ("graph", "tools", "prompts", "experts", "eval"):
                continue
            out[name] = path
    return out


def part_of(module: str) -> str:
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANKS and parts[1] not in ("core", "top"):
        return parts[1]
    return "core"


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path``, resolved against ``known``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def add(line: int, name: str) -> None:
        if name.split(".")[0] == "anomalyclaw":
            found.append((line, name))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(node.lineno, sub if sub in known else target)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "attach":
            # lazy_loader.attach(__name__, submod_attrs={"module": [...]}): imports on first use
            for kw in node.keywords:
                if kw.arg in ("submod_attrs", "submodules") and isinstance(kw.value, (ast.Dict, ast.List, ast.Set)):
                    keys = kw.value.keys if isinstance(kw.value, ast.Dict) else kw.value.elts
                    for key in keys:
                        if isinstance(key, ast.Constant):
                            add(node.lineno, f"{module}.{key.value}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(node.lineno, arg.value)
    return found


def import_graph(mods: dict[str, Path]) -> dict[str, list[tuple[int, str]]]:
    known = set(mods)
    return {name: [(line, target) for line, target in imports_of(name, path, known) if target != name]
            for name, path in mods.items()}


def upward_imports(graph: dict[str, list[tuple[int, str]]], mods: dict[str, Path]) -> list[str]:
    bad = []
    for name, targets in graph.items():
        here = part_of(name)
        for line, target in targets:
            there = part_of(target)
            if here == "top" or there == here:
                continue
            if there == "top" or RANKS[there] >= RANKS[here]:
                bad.append(f"{mods[name].relative_to(REPO)}:{line}: {here} module {name} imports {there} "
                           f"module {target}")
    return bad


def circles(graph: dict[str, list[tuple[int, str]]], folders: dict[str, str]) -> list[list[str]]:
    """Strongly connected groups of two or more modules of one folder (Tarjan)."""
    edges = {m: sorted({t for _, t in targets if t in graph and folders[t] == folders[m]})
             for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def folders_of(mods: dict[str, Path]) -> dict[str, str]:
    """The folder each module lives in (a package's own __init__ belongs to its folder)."""
    return {m: str(p.parent.relative_to(REPO)) for m, p in mods.items()}


def test_the_parts_are_where_pyproject_says():
    mods = modules()
    for part in ("experts", "prompts", "tools", "graph", "eval"):
        assert f"anomalyclaw.{part}" in mods, f"no package anomalyclaw.{part} under {package_dirs()}"


def test_every_package_folder_is_installed():
    """A folder with an __init__.py that pyproject does not list would be missing from a wheel."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'^\s*"(anomalyclaw[\w.]*)",?\s*$', text, re.M))
    packages = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert packages <= listed, f"packages missing from [tool.setuptools] packages: {sorted(packages - listed)}"


def test_imports_run_downwards_only():
    mods = modules()
    bad = upward_imports(import_graph(mods), mods)
    assert not bad, "imports that run upward:\n" + "\n".join(bad)


def test_no_folder_holds_a_circle():
    mods = modules()
    found = circles(import_graph(mods), folders_of(mods))
    assert not found, "import circles inside a folder:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("source", [
    "from anomalyclaw.eval.running.records import Record\n",
    "def f():\n    from anomalyclaw.graph import pipeline\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from anomalyclaw.cli import main\n",
])
def test_the_checker_catches_an_upward_import(tmp_path, source):
    """A tools module importing eval, graph or the command line (even inside a function) fails."""
    probe = tmp_path / "probe.py"
    probe.write_text(source, encoding="utf-8")
    mods = {**modules(), "anomalyclaw.tools._probe": REPO / "tools" / "_probe.py"}
    graph = {"anomalyclaw.tools._probe": imports_of("anomalyclaw.tools._probe", probe, set(mods))}
    assert upward_imports(graph, mods)


def test_the_checker_catches_a_circle():
    graph = {"anomalyclaw.tools.a": [(1, "anomalyclaw.tools.b")], "anomalyclaw.tools.b": [(3, "anomalyclaw.tools.a")],
             "anomalyclaw.tools.c": [(1, "anomalyclaw.tools.a")]}
    assert circles(graph, dict.fromkeys(graph, "tools")) == [["anomalyclaw.tools.a", "anomalyclaw.tools.b"]]
