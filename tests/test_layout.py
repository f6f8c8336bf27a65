"""The floor plan holds: imports go one way between the rooms, there is no import circle, no module grows
past the size a reader takes in, and the README's tree names every module there is."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 450
# room -> the rooms it may import (itself always)
ALLOWED = {
    "service.model": set(),
    "service.history": {"service.model"},
    "service.api": {"service.model", "service.history", "service.pb"},
    "service.client": {"service.model", "service.pb"},
    "service": {"service.model", "service.api"},  # service/__main__.py: the command line of the server
    "training": {"service.model"},
}


def modules() -> dict[str, str]:
    """Every module of service/ and training/ (generated stubs aside): dotted name -> path."""
    found = {}
    for top in ("service", "training"):
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d not in ("pb", "__pycache__")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def imports(path: str) -> set[str]:
    """The project modules a file imports (service.*, training.*), at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in out if name.split(".")[0] in ("service", "training")}


def room(name: str) -> str:
    """The room of a module: service.model, service.history, service.api, service.client, service.pb, training."""
    parts = name.split(".")
    if parts[0] == "training":
        return "training"
    if len(parts) > 1 and parts[1] in ("model", "history", "api", "client", "pb"):
        return ".".join(parts[:2])
    return "service"


def test_imports_go_one_way_between_the_rooms():
    wrong = []
    for name, path in modules().items():
        mine = room(name)
        for target in imports(path):
            theirs = room(target)
            if theirs != mine and theirs not in ALLOWED[mine] and target not in ("service",):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle():
    known = modules()
    graph = {name: {t for t in imports(path) if t in known and t != name} for name, path in known.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        seen[name] = 1
        for target in sorted(graph[name]):
            if seen.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in seen:
                visit(target, [*path, target])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])


def test_no_module_is_longer_than_a_reader_takes_in():
    long = {
        name: n for name, path in modules().items() if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_readme_tree_names_every_module():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    tree = readme[readme.index("## Where things live") :]
    tree = tree[: tree.index("\n## ", 4)]
    named = set(re.findall(r"[\w]+\.py", tree))
    missing = sorted(
        os.path.relpath(path, ROOT)
        for name, path in modules().items()
        if os.path.basename(path) not in named and not path.endswith("__init__.py")
    )
    assert not missing, f"README's 'Where things live' does not name: {missing}"
    present = {
        name
        for top in ("service", "training", "benchmarks", "scripts", "tests")
        for _, _, files in os.walk(os.path.join(ROOT, top))
        for name in files
    }
    gone = sorted(named - present)
    assert not gone, f"README's tree names files that do not exist: {gone}"
