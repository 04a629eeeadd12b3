"""The `dpsgd` command line. Each command lives in its own module; this one assembles the Typer app."""

from dpsgd_cli.cli import train as _train  # noqa: F401  (registers `dpsgd train`)
from dpsgd_cli.cli.app import app

__all__ = ["app"]
