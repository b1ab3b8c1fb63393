"""The folders of the package depend on each other one way.

Every import in every module counts, lazy ones inside functions included: an
import deferred for start-up speed is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import deep3m

PACKAGE = Path(deep3m.__file__).resolve().parent
# Generated protocol stubs: imported by many, import nothing of ours.
GENERATED = {"v1"}
ROLES = {"scheduler", "tiling", "training", "inference", "postprocess"}

Edges = dict[str, dict[str, list[str]]]


def folder_imports() -> Edges:
    """``{folder: {imported folder: [importing modules]}}`` across the package."""
    edges: Edges = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if len(rel.parts) < 2 or rel.parts[0] in GENERATED:
            continue
        folder = rel.parts[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "deep3m" and len(parts) > 1 and parts[1] != folder:
                    target = parts[1]
                    if (PACKAGE / target).is_dir():
                        edges[folder][target].append(str(rel))
    return edges


def cycles(edges: Edges) -> list[list[str]]:
    """Strongly connected groups of more than one folder (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_known_dependencies() -> None:
    edges = folder_imports()
    # A walk that found nothing would pass every check below.
    assert "core" in edges["client"] and "runtime" in edges["scheduler"]


def test_no_import_cycle_between_folders() -> None:
    edges = folder_imports()
    problems = [
        " ↔ ".join(group)
        + ": "
        + "; ".join(
            f"{a} → {b} ({', '.join(sorted(set(edges[a][b])))})"
            for a in group
            for b in group
            if b in edges.get(a, {})
        )
        for group in cycles(edges)
    ]
    assert not problems, "import cycles between folders:\n" + "\n".join(problems)


def test_core_imports_no_other_folder() -> None:
    assert dict(folder_imports().get("core", {})) == {}


def test_roles_never_import_each_other() -> None:
    edges = folder_imports()
    crossing = {
        f"{role} → {other}": sorted(set(edges[role][other]))
        for role in ROLES
        for other in ROLES & set(edges.get(role, {}))
    }
    assert crossing == {}


def test_cycles_are_detected() -> None:
    # The detector itself: a two-folder loop and a three-folder loop, beside a chain.
    edges: Edges = {
        "a": {"b": ["a/x.py"]},
        "b": {"a": ["b/y.py"], "c": ["b/z.py"]},
        "c": {"d": ["c/w.py"]},
        "d": {"e": []},
        "e": {"c": []},
    }
    assert sorted(cycles(edges)) == [["a", "b"], ["c", "d", "e"]]


def test_the_services_never_import_test_support() -> None:
    # ``testing/`` is not in the wheel: a service importing it would fail when installed.
    edges = folder_imports()
    importers = {
        folder: sorted(set(edges[folder]["testing"]))
        for folder in edges
        if "testing" in edges[folder] and folder != "testing"
    }
    assert importers == {}
