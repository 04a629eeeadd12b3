"""CONTRIBUTING.md's module map against the tree: every module listed exists, every module is listed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dpsgd_cli"
ENTRY = re.compile(r"^- `([^`]+)` — (.*)$")


def _module_map() -> list[tuple[str, str]]:
    """(path relative to dpsgd_cli/, description) for each line of the "Module map" section."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = re.search(r"^## Module map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, 'CONTRIBUTING.md has no "## Module map" section'
    entries = [m.groups() for line in section.group(1).splitlines() if (m := ENTRY.match(line))]
    assert entries, "the module map lists no module"
    return entries


def _listed_file(path: str) -> Path:
    """The file a map entry stands for: a folder entry (`privacy/`) stands for its package's __init__.py."""
    return PACKAGE / path / "__init__.py" if path.endswith("/") else PACKAGE / path


def test_every_module_listed_exists_with_a_description():
    entries = _module_map()
    paths = [path for path, _ in entries]
    assert len(paths) == len(set(paths)), sorted(p for p in paths if paths.count(p) > 1)
    missing = [path for path in paths if not _listed_file(path).is_file()]
    assert not missing, f"listed in CONTRIBUTING.md but not in dpsgd_cli/: {missing}"
    assert all(description.strip() for _, description in entries)


def test_every_module_is_listed():
    listed = {_listed_file(path).resolve() for path, _ in _module_map()}
    modules = sorted(p.resolve() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(modules) > 50  # the walk found the package
    unlisted = [str(p.relative_to(PACKAGE.resolve())) for p in modules if p not in listed]
    assert not unlisted, f"modules missing from CONTRIBUTING.md's module map: {unlisted}"
