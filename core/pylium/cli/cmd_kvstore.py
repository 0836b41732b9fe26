"""`pylium kvstore get KEY | list PREFIX | watch PREFIX`: look into the agent's KV store."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import click

from pylium.agent.client import AgentClient
from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option
from pylium.errors import UserError


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _short(value: Any, width: int = 80) -> str:
    text = _show(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _items_table(data: dict):
    return make_table(
        ["KEY", "VALUE", "MOD REV", "CREATE REV", "LEASE"],
        [[i["key"], _short(i["value"]), i["mod_revision"], i["create_revision"],
          f"{i['lease']:x}" if i["lease"] else ""] for i in data["items"]])


def _event_line(event: dict) -> str:
    if event["type"] == "delete":
        return f"DELETE {event['key']} (rev {event['revision']})"
    return f"PUT {event['key']} = {_show(event['value'])} (rev {event['revision']})"


def _stream(client: AgentClient, path: str):
    """Watch events as they arrive; an error reported mid-stream ends it with that error."""
    for data in client.stream(path):
        if "error" in data:
            raise UserError(data["error"])
        yield data


def register(cli: click.Group) -> None:
    @cli.group("kvstore")
    def kvstore() -> None:
        """Look into the cluster-state KV store the agent uses."""

    @kvstore.command("get")
    @click.argument("key")
    @output_option
    @click.pass_context
    def get(ctx, key: str, output: str) -> None:
        """Print one key's value (JSON values pretty-printed)."""
        item = client_from(ctx).get("/v1/kvstore/get?" + urlencode({"key": key}))
        emit(item, output, lambda i: i["value"] if isinstance(i["value"], str)
             else json.dumps(i["value"], indent=2, sort_keys=True))

    @kvstore.command("list")
    @click.argument("prefix", default="")
    @output_option
    @click.pass_context
    def list_(ctx, prefix: str, output: str) -> None:
        """Every key under PREFIX, sorted, with revisions and leases."""
        data = client_from(ctx).get("/v1/kvstore/list?" + urlencode({"prefix": prefix}))
        emit(data, output, _items_table)

    @kvstore.command("watch")
    @click.argument("prefix", default="")
    @click.option("--after-revision", type=click.IntRange(min=0), default=0,
                  help="Replay changes after this revision first (default: from now).")
    @click.option("--count", type=click.IntRange(min=0), default=0,
                  help="Stop after this many events (default: run until interrupted).")
    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                  show_default=True, help="table: one line per change; json: NDJSON.")
    @click.pass_context
    def watch(ctx, prefix: str, after_revision: int, count: int, output: str) -> None:
        """Print changes under PREFIX as they happen."""
        query = {"prefix": prefix, "after_revision": after_revision, "count": count}
        for event in _stream(client_from(ctx), "/v1/kvstore/watch?" + urlencode(query)):
            click.echo(json.dumps(event) if output == "json" else _event_line(event))
