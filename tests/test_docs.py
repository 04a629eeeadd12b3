"""The documentation: every config key is described, the site builds in strict mode (a broken link, a
missing page or an unknown anchor fails), the generated reference pages list every key and command, and
no page speaks of how the work was organised."""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpsgd_cli.config import ExperimentConfig, reference_rows

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _schema_keys() -> list[str]:
    """Every dotted key, read from the dataclasses themselves (not from reference_rows)."""
    defaults = ExperimentConfig()
    keys = []
    for f in dataclasses.fields(ExperimentConfig):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
        else:
            keys.append(f.name)
    return keys


def test_every_config_key_has_a_one_line_help():
    rows = reference_rows()
    assert [row[0] for row in rows] == _schema_keys()
    missing = [row[0] for row in rows if not str(row[2]).strip()]
    assert not missing, f"config keys without a help text: {missing}"
    multiline = [row[0] for row in rows if "\n" in str(row[2])]
    assert not multiline, f"help texts should be one line: {multiline}"


HISTORY = re.compile(r"\bissue\s*#?\d|\bround[- ]\d|\brounds \d|\bsession", re.IGNORECASE)


def test_no_page_speaks_of_issues_rounds_or_sessions():
    pattern = HISTORY
    found = []
    for page in sorted([*DOCS.rglob("*.md"), ROOT / "README.md"]):
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert not found, "\n".join(found)


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)
             if not re.match(r"[a-z]+:", target) and not target.startswith("#")]
    assert links, "README links to no documentation page"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (make install installs them)")
    out = tmp_path_factory.mktemp("site")
    # not --quiet: mkdocs' --quiet also hides the warnings that --strict counts
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


def _page(site: Path, page: str) -> str:
    return (site / page / "index.html").read_text(encoding="utf-8")


def _visible(raw_html: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw_html)).split())


def test_the_config_reference_lists_every_key_with_its_help(site):
    raw = _page(site, "config")
    visible = _visible(raw)
    for key, _default, help_, *_ in reference_rows():
        assert f"<code>{key}</code>" in raw, key
        assert " ".join(help_.replace("`", "").split()[:4]) in visible, key


def test_the_cli_reference_lists_every_command_and_option(site):
    import typer.main

    from dpsgd_cli.cli import app

    raw = _page(site, "cli")
    visible = _visible(raw)
    commands = []  # (path, command, context), walked here apart from the hook

    def walk(group, ctx, path):
        for name in group.list_commands(ctx):
            sub = group.get_command(ctx, name)
            sub_ctx = sub.make_context(name, [], parent=ctx, resilient_parsing=True)
            if hasattr(sub, "list_commands"):
                walk(sub, sub_ctx, [*path, name])
            else:
                commands.append(([*path, name], sub, sub_ctx))

    group = typer.main.get_command(app)
    walk(group, group.make_context("dpsgd", [], resilient_parsing=True), ["dpsgd"])
    assert {"train", "epsilon", "sweep", "export"} <= {path[1] for path, _, _ in commands}
    for path, command, ctx in commands:
        assert f'id="{"-".join(path)}"' in raw, path
        for param in command.get_params(ctx):
            if param.param_type_name == "option" and not param.hidden:
                assert param.opts[0] in visible, f"{' '.join(path)} {param.opts[0]}"
    # help text is shown literally, not read as HTML: `results/<name>/` survives
    assert "results/<name>/metrics.csv" in visible


def test_the_runs_page_lists_the_metrics_columns_in_order(site):
    from dpsgd_cli.runs.results import METRIC_COLUMNS

    visible = _visible(_page(site, "runs"))
    per_class = [column for column in METRIC_COLUMNS if column.startswith("test_accuracy_class_")]
    assert len(per_class) == 10
    listed = [column for column in METRIC_COLUMNS if column not in per_class]
    assert ", ".join(listed) + ", test_accuracy_class_0 … test_accuracy_class_9" in visible


def test_the_generated_pages_speak_of_no_issues_rounds_or_sessions(site):
    """The help texts and config descriptions the reference pages are made of follow the same rule."""
    for page in ("cli", "config", "runs"):
        found = HISTORY.findall(_visible(_page(site, page)))
        assert not found, (page, found)
