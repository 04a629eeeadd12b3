"""The product says what it is, not how the work on it was organised: no issue or round numbers in the
code, help texts, configs, Makefile or benchmarks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = sorted([*ROOT.glob("dpsgd_cli/**/*.py"), *ROOT.glob("configs/*.yaml"),
                  *ROOT.glob("benchmarks/*.py"), ROOT / "Makefile"])
HISTORY = re.compile(r"\b(issues?|rounds?) #?\d+|\bseed experiment\b", re.IGNORECASE)


def test_the_product_files_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PRODUCT}
    assert {"Makefile", "dpsgd_cli/cli/bench.py", "configs/quickstart.yaml"} <= names


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_trace_of_how_the_work_was_organised(path):
    hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if HISTORY.search(line)]
    assert not hits, hits
