"""The CLI's way to its agent: the socket chosen by `-H`/`PYLIUM_SOCKET` on the root group."""

from __future__ import annotations

import click

from pylium.agent.client import AgentClient


def client_from(ctx: click.Context) -> AgentClient:
    return AgentClient(ctx.find_root().obj["socket"])
