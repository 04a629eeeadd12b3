"""`dpsgd config schema` and `dpsgd config show`: the config file's JSON Schema (editor completion and
checking) and a config as dpsgd reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dpsgd_cli.cli.app import app, console, user_errors
from dpsgd_cli.cli.train import ConfigOption, SetOption

config_app = typer.Typer(name="config", no_args_is_help=True,
                         help="The experiment config: its JSON Schema, and a config as dpsgd reads it.")
app.add_typer(config_app, name="config")


@config_app.command("schema")
@user_errors
def schema(
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the schema to this file (atomically) instead of printing it.")] = None,
) -> None:
    """Print the JSON Schema of the YAML config, for editors.

    Draft-07: every key with its description, type, default and allowed values; unknown keys refused. Point
    an editor's YAML support at it (docs/editor-support.md)."""
    from dpsgd_cli.config import json_schema_text

    text = json_schema_text()
    if output is None:
        typer.echo(text, nl=False)
        return
    from dpsgd_cli.atomic import atomic_write_text

    atomic_write_text(output, text)
    console.print(f"wrote {output}", highlight=False, markup=False, soft_wrap=True)


@config_app.command("show")
@user_errors
def show(config: ConfigOption = None, overrides: SetOption = None) -> None:
    """Print a config as dpsgd reads it (YAML, every key).

    The file with --set applied, defaults filled in, other names of a value replaced by the current one,
    checked as `dpsgd train` checks it (a bad key or value: one error line, exit 2). σ for a target ε is
    computed when a run starts; `dpsgd noise` answers it beforehand."""
    import yaml

    from dpsgd_cli.config import load_config

    cfg = load_config(config, overrides)
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), nl=False)
