"""The tree's promises, read from the source: no import circles between modules or between
packages, `prunenet` never imports `envs`, no module grows past ~400 lines without saying why at
its top, and none past 600 (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prunenet", "envs")
MAX_LINES = 400
# Past this, a module is split whatever its reason (one job per module).
HARD_LIMIT = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")
    }


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every project module `path` imports, at any depth (lazy imports inside functions count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else a name of a.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if _is_parent_package(target, node):
                continue  # importing a.b runs a/__init__ first: a parent, not a dependency
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _is_parent_package(target: str, node: str) -> bool:
    return node.startswith(f"{target}.")


def test_the_import_graph_has_no_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def package_of(module: str) -> str:
    """The package a module belongs to, one level below the top (`prunenet.io.cache` ->
    `prunenet.io`); a top-level module is its own (`prunenet.pipeline`)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The import graph between packages (imports inside one package left out)."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = package_of(module)
        packages.setdefault(source, set()).update(
            package_of(t) for t in targets if package_of(t) not in (source, t.split(".")[0])
        )
    return packages


def test_the_package_graph_has_no_cycles() -> None:
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_package_cycles_are_found_where_modules_alone_have_none() -> None:
    # a.x -> b.y -> a.z: no module cycle, but a and b import each other.
    graph = {"p.a.x": {"p.b.y"}, "p.b.y": {"p.a.z"}, "p.a.z": set()}
    assert find_cycle(graph) is None
    assert find_cycle(package_graph(graph)) == ["p.a", "p.b", "p.a"]


def test_no_module_is_over_the_hard_limit() -> None:
    too_long = [
        f"{name} ({len(path.read_text().splitlines())} lines)"
        for name, path in source_modules().items()
        if len(path.read_text().splitlines()) > HARD_LIMIT
    ]
    assert too_long == []


def test_prunenet_never_imports_envs() -> None:
    offenders = {
        name: sorted(t for t in targets if t.split(".")[0] == "envs")
        for name, targets in import_graph().items()
        if name.split(".")[0] == "prunenet"
    }
    assert {name: envs for name, envs in offenders.items() if envs} == {}


def test_long_modules_say_why_at_their_top() -> None:
    unexplained = []
    for name, path in source_modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and "Why this module is long" not in text[:3000]:
            unexplained.append(f"{name} ({len(text.splitlines())} lines)")
    assert unexplained == []


# The checker itself must be able to fail: a planted cycle and a planted envs import are found.


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": set()}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_relative_and_lazy_imports_are_read(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("from .b import x\n\ndef f():\n    import envs.ffn\n")
    found = imports_of(source, "prunenet.a.mod", {"prunenet.a.b", "envs.ffn", "envs"})
    assert found == {"prunenet.a.b", "envs.ffn"}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_read(package: str) -> None:
    assert any(name.split(".")[0] == package for name in source_modules())
