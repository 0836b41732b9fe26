"""Output for people (rich tables) and machines (`-o json|yaml`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

OUTPUT_CHOICES = click.Choice(["table", "json", "yaml"])


def output_option(func):
    """`-o/--output table|json|yaml` on a listing command."""
    return click.option("-o", "--output", type=OUTPUT_CHOICES, default="table",
                        show_default=True, help="Output format.")(func)


def emit(data: Any, output: str, table: Callable[[Any], Table | str] | None = None) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        rendered = table(data) if table else yaml.safe_dump(data, sort_keys=False)
        if isinstance(rendered, str):
            click.echo(rendered.rstrip())
        else:
            console = Console(soft_wrap=True)
            if not console.is_terminal:
                console = Console(soft_wrap=True, width=240)
            console.print(rendered)


def make_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> Table:
    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if c is None else str(c) for c in row))
    return table
