"""The Typer app, the shared console, and the one place user errors become exit codes."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from dpsgd_cli.cli import quiet
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


def reflow_help(typer_app: typer.Typer) -> None:
    """Give every command of `typer_app` (and of its sub-apps) its docstring with each paragraph on one line.

    Typer's help keeps a docstring's single line breaks, which leaves ragged lines at any terminal width
    but the source's; the terminal then wraps the paragraphs itself. Paragraphs whose lines are indented or
    bulleted keep their breaks."""
    for info in typer_app.registered_commands:
        text = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if text:
            paragraphs = inspect.cleandoc(text).split("\n\n")
            info.help = "\n\n".join(_one_line(paragraph) for paragraph in paragraphs)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


def _one_line(paragraph: str) -> str:
    lines = paragraph.splitlines()
    if any(line.startswith((" ", "-", "*", "\b")) for line in lines[1:]):
        return paragraph
    return " ".join(line.strip() for line in lines)


def fail(message: str, code: int = 2) -> None:
    """Print one line `error: message` to stderr and exit with `code` (no traceback)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _click_exception() -> type[Exception]:
    """Click's ClickException, the base of every command-line error Typer raises (usage errors, bad
    values). Recent Typer vendors Click privately, so it is found through a public Typer class."""
    return next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")


def run(argv: list[str] | None = None) -> int:
    """The `dpsgd` program: run the app and return its exit code.

    A malformed command line (unknown command or option, a value that does not parse, a missing value)
    becomes one line `error: … (see 'dpsgd <command> --help')` on stderr with Click's exit code (2),
    instead of Typer's usage box."""
    try:
        code = app(args=argv, prog_name="dpsgd", standalone_mode=False)
    except _click_exception() as exc:
        message = " ".join(exc.format_message().split())
        if not message:  # `dpsgd` alone: the help was printed already
            return int(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path if ctx is not None else 'dpsgd'} --help')"
        err_console.print(f"[bold red]error:[/] {escape(message)}{escape(hint)}", highlight=False,
                          soft_wrap=True)
        return int(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        return 1
    return code if isinstance(code, int) else 0


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
def main(
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show TensorFlow's own start-up and log lines (also: "
        f"{quiet.VERBOSE_ENV}=1).")] = False,
) -> None:
    """dpsgd: DP-SGD experiments with honest privacy accounting. Start with `dpsgd train --help`."""
    if not (verbose or quiet.verbose_requested()):
        quiet.install()
