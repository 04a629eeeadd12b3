"""MkDocs hook: the CLI and config reference pages are generated at build time, so they cannot drift.

A page holding the marker `<!-- dpsgd:cli-reference -->` gets every `dpsgd` command's usage, help and
options, read from the Typer app (`typer.main.get_command`); one holding `<!-- dpsgd:config-reference -->`
gets a table per config section from `dpsgd_cli.config.reference_rows()` (dotted key, default, help).
`<!-- dpsgd:metrics-columns -->` becomes the columns of metrics.csv (`runs.results.METRIC_COLUMNS`).
A page with a marker that cannot be filled fails the build."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import sys
from pathlib import Path
from typing import Any

CLI_MARKER = "<!-- dpsgd:cli-reference -->"
CONFIG_MARKER = "<!-- dpsgd:config-reference -->"
METRICS_MARKER = "<!-- dpsgd:metrics-columns -->"
_MD_SPECIAL = re.compile(r"([\\*_\[\]|])")


def on_config(config: Any) -> Any:
    """Import `dpsgd_cli` from the checkout being built, not from wherever it was installed."""
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_reference())
    if METRICS_MARKER in markdown:
        markdown = markdown.replace(METRICS_MARKER, metrics_columns())
    return markdown


def _text(text: str) -> str:
    """Plain help text as Markdown: `code spans` kept, everything else shown literally."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") and p.endswith("`") and len(p) > 1
                   else _MD_SPECIAL.sub(r"\\\1", html.escape(p, quote=False)) for p in parts)


def _cell(text: str) -> str:
    return " ".join(_text(text).split())


def _code(text: str) -> str:
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}".replace("|", "\\|")


def _commands(command: Any, ctx: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(command path, command, its context) for every visible command under a group, depth first;
    a sub-group (`dpsgd config`) stands for its own subcommands."""
    found = []
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = sub.make_context(name, [], parent=ctx, resilient_parsing=True)
        if hasattr(sub, "list_commands"):
            found += _commands(sub, sub_ctx, f"{path} {name}")
        else:
            found.append((f"{path} {name}", sub, sub_ctx))
    return found


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def cli_reference() -> str:
    """Markdown for every command of the `dpsgd` app: usage, help paragraphs, arguments and options."""
    import typer.main

    from dpsgd_cli.cli import app

    group = typer.main.get_command(app)
    root = group.make_context("dpsgd", [], resilient_parsing=True)
    commands = _commands(group, root, "dpsgd")
    out = [_text(group.help.strip()), ""] if group.help else []
    out += ["| command | what it does |", "|---|---|"]
    for path, command, _ in commands:
        first = (command.help or "").strip().split("\n\n")[0]
        out.append(f"| [`{path}`](#{_anchor(path)}) | {_cell(first)} |")
    out.append("")
    for path, command, ctx in commands:
        params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
        arguments = [p for p in params if p.param_type_name == "argument"]
        options = [p for p in params if p.param_type_name == "option"]
        usage = " ".join([path, "[OPTIONS]" if options else "", *(p.name.upper() for p in arguments)])
        out += [f"## {path}", "", "```", " ".join(usage.split()), "```", ""]
        for paragraph in (command.help or "").strip().split("\n\n"):
            out += [" ".join(_text(paragraph).split()), ""]
        for title, group_params in (("Arguments", arguments), ("Options", options)):
            rows = []
            for param in group_params:
                record = param.get_help_record(ctx)
                if record is None:
                    continue
                names_, help_ = record
                if param.param_type_name == "argument":
                    names_ = param.name.upper() + names_[len(param.name):]
                rows.append(f"| {_code(names_)} | {_cell(help_)} |")
            if rows:
                out += [f"**{title}**", "", f"| {title[:-1].lower()} | meaning |", "|---|---|", *rows, ""]
    return "\n".join(out)


def _default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "—"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def config_reference() -> str:
    """Markdown tables of every config key, one per section, from the schema's own help texts: rows
    (dotted key, default, help[, allowed values or None]) from `dpsgd_cli.config.reference_rows()`."""
    from dpsgd_cli.config import reference_rows

    sections: dict[str, list[str]] = {}
    for key, default, help_, *rest in reference_rows():
        choices = rest[0] if rest else None
        meaning = _cell(help_)
        if choices:
            meaning += " — one of " + ", ".join(_code(_default(c)) for c in choices)
        section = key.split(".")[0] if "." in key else ""
        sections.setdefault(section, []).append(f"| `{key}` | {_code(_default(default))} | {meaning} |")
    out = []
    for section, rows in sections.items():
        out += [f"## `{section}`" if section else "## Top level", "",
                "| key | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(out)


def metrics_columns() -> str:
    """The columns of metrics.csv in order, the per-class accuracies folded into one range."""
    from dpsgd_cli.runs.results import METRIC_COLUMNS

    per_class = [c for c in METRIC_COLUMNS if re.fullmatch(r"test_accuracy_class_\d+", c)]
    names = [f"`{c}`" for c in METRIC_COLUMNS if c not in per_class]
    if per_class:
        names.append(f"`{per_class[0]}` … `{per_class[-1]}`" if len(per_class) > 1 else f"`{per_class[0]}`")
    return ", ".join(names)
