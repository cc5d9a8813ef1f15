"""An analysis result in the terminal (`fastgrok analyze`): its warnings, notes and tables with rich (the
first TERMINAL_ROWS rows of a longer table), every value whole at any terminal width: a wide table splits into several, a long value folds onto
the next line, none is cut to an ellipsis. Numbers go through `display.format_value`, so the terminal
shows the values of report.md.
"""
from __future__ import annotations

import pandas as pd

from fastgrok.analysis.display import TABLES, display_table, format_value


TERMINAL_ROWS = 200
"""The most rows of a table the terminal shows (rich lays a table out at about a millisecond a row; a grid of
25,000 cells would take minutes and scroll out of sight): the first ones, then a line saying how many
there are; report.md has them all."""


def render_terminal(result: dict, console=None) -> None:
    """Print the result's warnings, notes and tables with rich (numbers via format_value, as in
    report.md), every value whole at the console's width (see `terminal_tables`)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    console.print(f"[bold]fastgrok analysis[/bold] {escape(str(result['dir']))}")
    for w in result["warnings"]:
        console.print(f"[bold red]warning:[/bold red] {escape(w)}")
    for n in result["notes"]:
        console.print(f"[yellow]note:[/yellow] {escape(n)}")
    for key, title in TABLES:
        if key in result:
            if key in result.get("texts", {}):
                console.print(escape(result["texts"][key].replace("**", "")))
            for table in terminal_tables(result[key], title, console.width):
                console.print(table)


def terminal_tables(df: pd.DataFrame, title: str, width: int) -> list:
    """rich renderables that show df whole in `width` terminal cells: a one-row table as
    field/value rows; otherwise its varying columns (`display_table`) in as many tables as it takes
    to fit (`column_groups`), then a line with the constant ones. A value wider than the terminal
    folds onto the next line; none is cut to an ellipsis."""
    from rich.text import Text

    if len(df) == 1:
        return [field_value_table(df.iloc[0], title)]
    consts, shown = display_table(df)
    cut = len(shown) > TERMINAL_ROWS
    shown = shown.iloc[:TERMINAL_ROWS] if cut else shown
    groups = column_groups(shown, width)
    out = [rich_table(shown[cols], title if len(groups) == 1 else f"{title} ({i}/{len(groups)})")
           for i, cols in enumerate(groups, start=1)]
    if cut:
        out.append(Text(f"first {TERMINAL_ROWS:,} of {len(df):,} rows; every row is in report.md"))
    if consts:
        out.append(Text("all rows: " + "; ".join(f"{k} = {format_value(v)}" for k, v in consts.items())))
    return out


def field_value_table(row: pd.Series, title: str):
    """One table row as a rich table of field / value rows, which fits any terminal width."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    table.add_column("field", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    for field, v in row.items():
        table.add_row(Text(str(field)), Text(format_value(v)))
    return table


def rich_table(df: pd.DataFrame, title: str):
    """df as a rich table, values right-justified, folded (never cut) when a column must narrow."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for c in df.columns:
        table.add_column(str(c), justify="right", overflow="fold")
    for row in df.itertuples(index=False):
        table.add_row(*(Text(format_value(v)) for v in row))
    return table


def column_width(df: pd.DataFrame, col) -> int:
    """Terminal cells a column of df takes in a rich table: its widest entry (header or value) plus
    the padding on either side and one border."""
    from rich.cells import cell_len

    return 3 + max([cell_len(str(col))] + [cell_len(format_value(v)) for v in df[col]])


def column_groups(df: pd.DataFrame, width: int) -> list[list]:
    """df's columns split into groups whose rich tables each fit `width` terminal cells; the first
    column (the rows' label, e.g. cell) leads every group. One group when the whole table fits."""
    if df.shape[1] == 0:
        return [[]]
    label, *rest = df.columns
    start = 1 + column_width(df, label)                 # the left border, then the label column
    groups, used = [[label]], start
    for c in rest:
        w = column_width(df, c)
        if len(groups[-1]) > 1 and used + w > width:
            groups.append([label])
            used = start
        groups[-1].append(c)
        used += w
    return groups
