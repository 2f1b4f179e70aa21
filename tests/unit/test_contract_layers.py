"""The import structure of greenstack (issue 16): layers that only point down, zero import cycles between
greenstack's packages (function-local imports included), no other module's private names, and an
ARCHITECTURE.md that names every package.

The layers themselves live in pyproject.toml (`[tool.importlinter]`, also run by `lint-imports`);
ARCHITECTURE.md explains them.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from collections import defaultdict
from pathlib import Path

import grimp
import networkx as nx
import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "greenstack"
ARCHITECTURE = REPO / "ARCHITECTURE.md"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("greenstack", cache_dir=None)


def _top(module: str) -> str:
    """`greenstack.carbon.forecast` -> `greenstack.carbon` (a top-level module is its own unit)."""
    return ".".join(module.split(".")[:2])


def _function_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported greenstack module) of every import inside a function body of `path`."""
    found = []
    for func in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("greenstack"):
                    found.append((node.lineno, node.module))
    return found


def test_the_import_graph_counts_function_local_imports(graph):
    """A cycle hidden in a function body is still a cycle: grimp must see those imports (else the
    checks below would pass by not looking)."""
    seen = 0
    for path in (PACKAGE / "cli" / "__init__.py", PACKAGE / "runner.py", PACKAGE / "measure.py"):
        importer = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        local = [(line, module) for line, module in _function_local_imports(path) if module in graph.modules]
        assert local, f"{path} has no function-local greenstack import any more: pick another module here"
        for line, module in local:
            lines = {d["line_number"] for d in graph.get_import_details(importer=importer, imported=module)}
            assert line in lines, f"grimp missed the function-local import {importer}:{line} -> {module}"
            seen += 1
    assert seen >= 3


def test_no_import_cycles_between_greenstack_packages(graph):
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            a, b = _top(importer), _top(imported)
            if a != b and b != "greenstack":  # `from greenstack import __version__` is the root, not a package
                for detail in graph.get_import_details(importer=importer, imported=imported):
                    edges[(a, b)].append(f"{importer}:{detail['line_number']} imports {imported}")
    cycles = sorted(nx.simple_cycles(nx.DiGraph(list(edges))), key=len)
    report = []
    for cycle in cycles[:20]:
        hops = list(zip(cycle, [*cycle[1:], cycle[0]], strict=True))
        report.append(" -> ".join([*cycle, cycle[0]]) + "\n" + "\n".join(f"    {edges[h][0]}" for h in hops))
    assert not cycles, f"{len(cycles)} import cycle(s) between greenstack packages:\n" + "\n".join(report)


def test_no_import_cycles_between_any_two_greenstack_modules(graph):
    """Inside a package too (e.g. a meter module importing the selector that imports it)."""
    g = nx.DiGraph([(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)])
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"modules importing each other (directly or around a circle): {cycles}"


def test_import_linter_contracts_are_kept():
    """The layers contract in pyproject.toml (what `lint-imports` checks in CI), run in-process."""
    from importlinter import api  # noqa: F401 - configures import-linter's adapters
    from importlinter.application import use_cases

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        kept = use_cases.lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)
    text = out.getvalue()
    assert kept, text
    assert "BROKEN" not in text and "0 broken" in text, text


def test_the_layers_contract_lists_every_package_once():
    """`exhaustive = true` makes import-linter refuse an unlisted package; listing one twice is caught here."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")
    assert layers.get("exhaustive") is True
    names = [n.strip() for layer in layers["layers"] for n in re.split(r"[|:]", layer)]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert set(names) == {_unit_name(p) for p in _units()}


def _units() -> list[Path]:
    """greenstack's top-level modules and its packages (directories with __init__.py), nested ones too."""
    modules = [p for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    packages = [p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE]
    return sorted(modules + packages)


def _unit_name(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_no_module_uses_another_modules_private_names():
    """A name used across modules is part of its home module's interface: it is public there."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    found = []
    for name, path in sorted(modules.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("greenstack"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("greenstack") and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names used from another module (make them public at home):\n" + "\n".join(found)


def test_architecture_md_names_every_package_and_top_level_module():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = []
    for path in _units():
        rel = path.relative_to(PACKAGE)
        shown = rel.as_posix() + ("/" if path.is_dir() else "")
        if f"`{shown}`" not in text:
            missing.append(shown)
    assert not missing, f"ARCHITECTURE.md does not describe: {', '.join(missing)} (add each, as `name/` or `name.py`)"


def test_architecture_md_has_the_sections_it_promises():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    for heading in ("## Layers", "## The import rule", "## Data flow of one run", "## Engine contract",
                    "## Runner phases and per-run context"):
        assert re.search(rf"^{re.escape(heading)}\b", text, re.M), heading
