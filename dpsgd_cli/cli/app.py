"""The Typer app, the shared console, and the one place user errors become exit codes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from dpsgd_cli.errors import DpsgdError

app = typer.Typer(
    name="dpsgd",
    help="Train CNNs with DP-SGD (TensorFlow/Keras 3) and report accuracy, (ε, δ) and speed honestly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one line `error: message` to stderr and exit with `code` (no traceback)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; turn DpsgdError into its one-line message and exit code, Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DpsgdError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            sys.exit(130)

    return wrapper


@app.callback()
def main() -> None:
    """dpsgd: DP-SGD experiments with honest privacy accounting. Start with `dpsgd train --help`."""
