"""The package's shape, read from the source (no imports run): the layers import one way only (down),
no import cycles between dpsgd_cli modules (counting imports inside functions too: a lazy import is still a
dependency), only the CLI imports typer/rich, and the modules that must answer without TensorFlow never
import it."""

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


PRIVACY_SIDE = sorted([m for m in GRAPH if m == "dpsgd_cli.config" or m.startswith("dpsgd_cli.config.")]
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


# Bottom to top. A module may import its own floor and the floors below it, never one above. The package
# itself (`dpsgd_cli`, the public API) stands on top of all of them, beside the CLI.
LAYERS = (
    ("dpsgd_cli.errors", "dpsgd_cli.atomic", "dpsgd_cli.labels", "dpsgd_cli.config"),  # ground floor
    ("dpsgd_cli.privacy",),  # sampling, accounting, calibration, keys, statements: no TensorFlow
    ("dpsgd_cli.training",),  # data, models, the DP engine, gradient rules, planner, trainer
    ("dpsgd_cli.runs",),  # a run directory's files: results, checkpoint, summaries, plots, export
    ("dpsgd_cli.audit",),  # audits of finished runs
    ("dpsgd_cli.experiment",),  # orchestration: one run, a sweep
    ("dpsgd_cli.keras_api",),  # DPModel for library users
    ("dpsgd_cli.cli", "dpsgd_cli.__main__", "dpsgd_cli"),  # the command line and the public API
)


def _floor(module: str) -> int | None:
    """The index in LAYERS of the most specific prefix naming `module`."""
    found, length = None, -1
    for index, floor in enumerate(LAYERS):
        for prefix in floor:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                found, length = index, len(prefix)
    return found


def test_every_module_has_a_floor():
    assert sorted(m for m in GRAPH if _floor(m) is None) == []


def test_layers_import_only_downwards():
    upward = sorted(f"{m} → {d}" for m, deps in GRAPH.items() for d in deps & INTERNAL
                    if d != "dpsgd_cli" and _floor(d) > _floor(m))
    assert upward == []


def test_the_layer_test_sees_an_upward_import():
    """The rule is not vacuous: the trainer importing the run orchestrator would break it."""
    assert _floor("dpsgd_cli.experiment.run") > _floor("dpsgd_cli.training.trainer")
    assert _floor("dpsgd_cli.runs.results") > _floor("dpsgd_cli.privacy.sampling")
