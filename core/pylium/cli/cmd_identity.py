"""`pylium identity list | get`."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option


def _table(identities):
    rows = []
    for identity in identities:
        labels = identity["labels"] or ["-"]
        rows.append([identity["id"], labels[0]])
        rows += [["", label] for label in labels[1:]]
    return make_table(["ID", "LABELS"], rows)


def register(cli: click.Group) -> None:
    @cli.group("identity")
    def identity() -> None:
        """Security identities (label set → number)."""

    @identity.command("list")
    @output_option
    @click.pass_context
    def identity_list(ctx, output: str) -> None:
        """Every identity the agent knows: reserved, allocated and CIDR."""
        emit(client_from(ctx).get("/v1/identity"), output, _table)

    @identity.command("get")
    @click.argument("number", type=int)
    @output_option
    @click.pass_context
    def identity_get(ctx, number: int, output: str) -> None:
        """One identity by number."""
        emit(client_from(ctx).get(f"/v1/identity/{number}"), output, lambda i: _table([i]))
