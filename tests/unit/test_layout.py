"""The source tree keeps the shape the README's layout section describes: no import circle
anywhere in ``tailor``, no program module at the top of ``tailor.workloads`` (each program
lives in the package of its own), and no source file over 800 lines but the dashboard
definitions. import-linter (``make lint``) enforces which layer may import which."""

from __future__ import annotations

from pathlib import Path

import grimp

import tailor

PACKAGE = Path(tailor.__file__).parent
MAX_LINES = 800
LONG_ALLOWED = {"observability/dashboards.py"}  # the Grafana panels, one definition each
KERNEL = {"__init__.py", "errors.py", "program.py", "progress.py"}


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """The import circles (Tarjan's strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle_anywhere() -> None:
    graph = grimp.build_graph("tailor")
    assert strongly_connected(graph) == []


def test_a_circle_is_found() -> None:
    """The check above could fail: two modules importing each other are a circle."""
    graph = grimp.ImportGraph()
    for module in ("a", "a.b", "a.c"):
        graph.add_module(module)
    graph.add_import(importer="a.b", imported="a.c")
    graph.add_import(importer="a.c", imported="a.b")
    assert strongly_connected(graph) == [{"a.b", "a.c"}]


def test_workloads_top_level_is_the_kernel_and_the_program_packages() -> None:
    top = PACKAGE / "workloads"
    modules = {p.name for p in top.glob("*.py")}
    assert modules == KERNEL, f"programs and libraries belong in a package: {modules - KERNEL}"
    packages = {p.name for p in top.iterdir() if (p / "__init__.py").exists()}
    assert packages == {"io", "training", "knowledge", "serving", "evaluation", "raft"}


def test_no_source_file_is_over_800_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in LONG_ALLOWED} == {}
