"""Tables readable at any terminal width (80 columns, a pipe, a log file).

`print_table` draws a rich Table as it is when rich can draw it in the console's width without cutting a
header or a cell to "…" (wrapping text at spaces is fine), and otherwise prints the same cells one block
per row, a `header  value` line per column.
"""

from __future__ import annotations

import io

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text


def fits(table: Table, console: Console, width: int | None = None) -> bool:
    """Whether rich draws `table` in `width` columns (default: the console's) with all its text: it is
    drawn off-screen at that width, and every word of every header and cell must appear in the drawing,
    with no "…" beyond those in the text itself (rich narrows columns below their longest word, down to
    nothing, when the columns' words do not fit)."""
    drawn = io.StringIO()
    Console(file=drawn, width=console.width if width is None else width, color_system=None,
            force_terminal=False).print(table)
    text = drawn.getvalue()
    words = [word for cell in _texts(table) for word in cell.split()]
    return text.count("…") == sum(cell.count("…") for cell in _texts(table)) and all(w in text for w in words)


def _texts(table: Table) -> list[str]:
    """The plain text of the headers (if shown) and of every cell (markup applied)."""
    cells: list[object] = [column.header for column in table.columns] if table.show_header else []
    cells += [cell for column in table.columns for cell in column.cells]
    return [_plain(cell) for cell in cells]


def _plain(text: object) -> str:
    if isinstance(text, Text):
        return text.plain
    return Text.from_markup(text).plain if isinstance(text, str) else ""


def vertical(table: Table) -> Group:
    """The cells of `table`, one block per row: its title, then `header  value` lines, a blank line
    before each row's block and after the last."""
    parts: list[RenderableType] = [Text(_plain(table.title), style="italic")] if table.title else []
    for index in range(table.row_count):
        block = Table.grid(padding=(0, 2))
        block.add_column(style="bold", no_wrap=True)
        block.add_column(overflow="fold")
        for column in table.columns:
            cells = list(column.cells)
            header = " ".join(_plain(column.header).split()) if table.show_header else ""
            block.add_row(header, cells[index] if index < len(cells) else "")
        parts += [Text(""), block]
    return Group(*parts, Text(""))


def fitted(table: Table, console: Console, width: int | None = None) -> RenderableType:
    """`table` if it fits `width` columns (default: the console's), else its `vertical` layout."""
    return table if fits(table, console, width) else vertical(table)


def print_table(table: Table, console: Console) -> None:
    """Print `table` on `console`, as a table when it fits the width, else one block per row."""
    console.print(fitted(table, console))
