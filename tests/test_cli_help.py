"""`dpsgd COMMAND --help`: each paragraph of a command's description is one line of text, so the terminal
wraps it at its own width (Typer alone keeps the docstring's line breaks: ragged lines at 80 columns)."""

from __future__ import annotations

import typer.main
from typer.testing import CliRunner

from dpsgd_cli.cli import app


def _commands(group, prefix=""):
    for name, command in sorted(group.commands.items()):
        if getattr(command, "commands", None):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def test_every_command_description_has_one_line_per_paragraph():
    commands = dict(_commands(typer.main.get_command(app)))
    assert {"train", "tune", "sweep", "config show"} <= set(commands)
    for name, command in commands.items():
        assert command.help, f"dpsgd {name} has no description"
        for paragraph in command.help.split("\n\n"):
            assert "\n" not in paragraph, f"dpsgd {name}: {paragraph!r}"


def test_a_wide_terminal_shows_a_paragraph_unbroken():
    result = CliRunner().invoke(app, ["tune", "--help"], env={"COLUMNS": "240"}, terminal_width=240)
    assert result.exit_code == 0
    lines = [line.strip() for line in result.output.splitlines()]
    assert any(line.startswith("The space,") and line.endswith("dpsgd tune --select.") for line in lines), \
        result.output
