"""The package's shape, read from the source (no imports run): no import cycles between dpsgd_cli modules
(counting imports inside functions too: a lazy import is still a dependency), only the CLI imports
typer/rich, and the modules that must answer without TensorFlow never import it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpsgd_cli"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module → every dpsgd_cli module and third-party top-level package it imports, anywhere in it."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names
                          if f"{node.module}.{alias.name}" in modules}
        graph[name] = {m if m in modules or not m.startswith("dpsgd_cli") else m.rsplit(".", 1)[0]
                       for m in found}
    return graph


GRAPH = _imports()
INTERNAL = {m for m in GRAPH}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module] & INTERNAL):
            if dep == module or _is_package_of(dep, module):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def _is_package_of(package: str, module: str) -> bool:
    """`dpsgd_cli.cli` imported by `dpsgd_cli.cli.train` (a package's __init__ registering its modules
    is not a design cycle)."""
    return module.startswith(package + ".")


def test_no_import_cycles():
    assert _cycle() is None, " → ".join(_cycle() or [])


def test_only_the_cli_imports_typer_and_rich():
    offenders = sorted(m for m, deps in GRAPH.items() if not m.startswith("dpsgd_cli.cli")
                       and {d.split(".")[0] for d in deps} & {"typer", "rich"})
    assert offenders == []


PRIVACY_SIDE = sorted(["dpsgd_cli.config", "dpsgd_cli.training.sampling"]
                      + [m for m in GRAPH if m.startswith("dpsgd_cli.privacy")])


def test_the_privacy_folder_is_found():
    assert {"dpsgd_cli.privacy.accounting", "dpsgd_cli.privacy.run_key"} <= set(PRIVACY_SIDE)


@pytest.mark.parametrize("module", PRIVACY_SIDE)
def test_privacy_side_never_imports_tensorflow(module):
    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo += [d for d in GRAPH.get(current, ()) if d in INTERNAL]
        return {d.split(".")[0] for m in seen for d in GRAPH.get(m, ())}

    assert not reaches(module) & {"tensorflow", "keras"}
