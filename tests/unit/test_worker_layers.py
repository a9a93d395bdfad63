"""The worker's layers (worker/__init__.py) import only what is below them: every import of
every worker module, those under ``TYPE_CHECKING`` and inside functions included, read from
the source, as import-linter's layers contract would read them."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[2] / "worker"

#: For each layer, the worker packages and modules it may import (beside itself). The leaves
#: (worker.http, worker.tls ...) and worker.interfaces are open to every layer.
LEAVES = {
    "worker.interfaces",
    "worker.http",
    "worker.tls",
    "worker.accesslog",
    "worker.log_throttle",
    "worker.accept_limit",
    "worker.h2",
}
ALLOWED = {
    "worker.interfaces": set(),
    "worker.h2": set(),
    "worker.http": {"worker.interfaces"},
    "worker.client": LEAVES,
    "worker.server": LEAVES,
    "worker.connector": LEAVES | {"worker.client"},
    "worker.proxy": LEAVES | {"worker.connector"},
    "worker.process": LEAVES | {"worker.server", "worker.proxy", "worker.connector"},
}


def module_name(path: Path) -> str:
    """``worker/server/h1.py`` -> ``worker.server.h1``."""
    parts = path.relative_to(WORKER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The worker modules ``path`` imports, wherever in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "worker"}
    return found


def layer(name: str) -> str | None:
    """The layer of a worker module (the longest key of :data:`ALLOWED` it is in)."""
    keys = [k for k in ALLOWED if name == k or name.startswith(k + ".")]
    return max(keys, key=len) if keys else None


@functools.cache
def modules() -> dict[str, set[str]]:
    """Every worker module and the worker modules it imports."""
    return {module_name(p): imports(p) for p in sorted(WORKER.rglob("*.py"))}


def existing(graph: dict[str, set[str]], name: str) -> str | None:
    """The module ``name`` is (``from pkg import mod`` names a module) or is in."""
    while name and name not in graph:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("name", sorted(n for n in modules() if layer(n) is not None))
def test_a_layer_imports_only_what_is_below_it(name: str) -> None:
    """A module of a layer imports its own layer, the leaves and the layers below, never a
    layer beside or above it."""
    graph = modules()
    own = layer(name)
    assert own is not None
    bad = []
    for imported in graph[name]:
        target = existing(graph, imported)
        if target is None or target == "worker":
            continue
        target_layer = layer(target) or target
        if target_layer == own or target_layer in ALLOWED[own]:
            continue
        bad.append(target)
    assert not bad, f"{name} ({own}) imports {sorted(set(bad))}"


def test_no_import_cycle() -> None:
    """The worker's modules form no cycle, counting imports made only for type checking."""
    graph = {
        n: {t for i in deps if (t := existing(modules(), i)) not in (None, "worker", n)}
        for n, deps in modules().items()
    }
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                raise AssertionError(" -> ".join([*path[path.index(m) :], m]))
            if m not in state:
                visit(m, [*path, m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
