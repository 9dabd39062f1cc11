"""The import graph shows the architecture: dependencies point one way (README, *Architecture*).

Imports are read with ``ast`` (every ``import`` in a module, at its top or inside a function),
so a lazy import counts like any other.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "engine"

CORE = {"engine.engine", "engine.outcome", "engine.record", "engine.errors", "engine.limits", "engine.paths",
        "engine.rules", "engine.compile", "engine.topsort"}
"""The core: rules in, outcomes out, no I/O beyond reading rule files."""
FRONT_ENDS = {"engine.ingest", "engine.cli", "engine.sandbox", "engine.http_server"}
"""Where events come from and how the tool is driven: HTTP servers, Kafka, the command line, the sandbox."""
OUTSIDE = ("confluent_kafka", "starlette", "uvicorn", "benchmarks")
"""Libraries (and the unpackaged benchmarks/ folder) only front-ends may import."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The modules ``name`` imports (absolute names), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _unit(module: str) -> str:
    """The node of the architecture a module belongs to: its subpackage, or itself at the top."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _graph() -> dict[str, set[str]]:
    """Which unit imports which (``engine.delivery`` → ``engine.record``, ...), the package's own ``__init__`` aside."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        if name == "engine" or name == "engine.__main__":
            continue
        for target in _imports(name, path):
            if target in modules and target != "engine" and _unit(target) != _unit(name):
                graph[_unit(name)].add(_unit(target))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_the_parts_of_the_package() -> None:
    assert _cycle(_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_the_core_and_delivery_import_no_front_end() -> None:
    graph = _graph()
    for unit in sorted(CORE | {"engine.delivery", "engine.mapping", "engine.reports"}):
        assert not graph.get(unit, set()) & FRONT_ENDS, f"{unit} imports {graph[unit] & FRONT_ENDS}"


def test_only_front_ends_import_servers_kafka_or_the_benchmarks() -> None:
    for name, path in _modules().items():
        if _unit(name) in FRONT_ENDS:
            continue
        outside = {m for m in _imports(name, path) if m.split(".")[0] in OUTSIDE}
        assert not outside, f"{name} imports {outside}"


def test_the_installed_cli_never_imports_the_benchmarks() -> None:
    for name, path in _modules().items():
        assert not {m for m in _imports(name, path) if m.split(".")[0] == "benchmarks"}, name


def test_run_loads_the_sandbox_only_when_asked() -> None:
    deliver = ROOT / "cli" / "deliver.py"
    top_level = ast.parse(deliver.read_text()).body
    imported = {node.module for node in top_level if isinstance(node, ast.ImportFrom)}
    assert not any(module and "sandbox" in module for module in imported)
