"""The trainer's layout holds: its import graph has no cycle (imports inside functions included), nothing
outside recipes imports recipes, core imports nothing of jobs, models or recipes, and models nothing of
jobs or recipes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[2] / "trainer" / "src" / "speechrl" / "trainer"
PACKAGE = "speechrl.trainer"


def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINER).with_suffix("").parts
    return ".".join((PACKAGE, *parts[:-1])) if parts[-1] == "__init__" else ".".join((PACKAGE, *parts))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The trainer modules path imports, anywhere in the file (`from speechrl.trainer.core import step` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in TRAINER.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph as a list of modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_of(module: str) -> str:
    return module.removeprefix(PACKAGE + ".").split(".")[0]


def test_the_trainer_import_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(("package", "forbidden"), [
    ("core", {"jobs", "models", "recipes"}),
    ("models", {"jobs", "recipes"}),
    ("jobs", {"recipes"}),
])
def test_packages_import_only_downwards(package: str, forbidden: set[str]) -> None:
    wrong = sorted(f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
                   if package_of(module) == package and package_of(target) in forbidden)
    assert not wrong, wrong


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above can fail: a graph with the config <-> losses <-> diffro cycle of old is caught.
    graph = {"config": {"losses"}, "losses": {"diffro"}, "diffro": {"config"}, "step": {"losses"}}
    assert find_cycle(graph) == ["config", "losses", "diffro", "config"]
