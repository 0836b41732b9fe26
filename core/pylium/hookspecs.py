"""pluggy hook specifications: capability hooks (each returns an iterable of frozen records)
and event hooks (called by the agent as things happen). Plugins implement them with
`@pylium.hookspecs.hookimpl`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pluggy

PROJECT = "pylium"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# capability hooks ------------------------------------------------------------------------
@hookspec
def pylium_routing_modes() -> Iterable[Any]:
    """Return `RoutingModeRecord`s: how this plugin reaches pods on other nodes."""


@hookspec
def pylium_kvstores() -> Iterable[Any]:
    """Return `KVStoreRecord`s: cluster-state backends."""


@hookspec
def pylium_l7_parsers() -> Iterable[Any]:
    """Return `L7ParserRecord`s: L7 protocols this plugin can parse and enforce."""


@hookspec
def pylium_encryptions() -> Iterable[Any]:
    """Return `EncryptionRecord`s: transparent node-to-node encryption schemes."""


@hookspec
def pylium_orchestrators() -> Iterable[Any]:
    """Return `OrchestratorRecord`s: sources of endpoints, labels and policies."""


# event hooks -----------------------------------------------------------------------------
@hookspec
def pylium_endpoint_created(endpoint: Any) -> None:
    """An endpoint got its IP, identity and datapath (called after it is ready)."""


@hookspec
def pylium_endpoint_deleted(endpoint: Any) -> None:
    """An endpoint was removed."""


@hookspec
def pylium_node_joined(node: Any) -> None:
    """Another node registered in the cluster."""


@hookspec
def pylium_node_left(node: Any) -> None:
    """A node left the cluster (deregistered or its lease expired)."""


@hookspec
def pylium_policy_changed(revision: int, added: list[Any], deleted: list[Any]) -> None:
    """The policy repository changed to `revision` (every import and delete, and the
    policies loaded at agent start): `added`/`deleted` are `NamedRule`s (`.rule`, `.name`)."""


@hookspec(firstresult=True)
def pylium_l7_parser_for_port(port: int, protocol: str) -> str | None:
    """Which L7 parser (by name) takes redirected traffic to `port` when no running parser
    is named like the rule's protocol (first answer wins; None: nobody, the redirect is
    enforced as deny). Asked by the core's L7 component."""


# command-line hooks ----------------------------------------------------------------------
@hookspec
def pylium_cli_commands() -> Iterable[Any]:
    """Return `click.Command`s to add to the `pylium` CLI (e.g. `pylium k8s ...`). Asked only
    when a command name is not one of the core's, so plain commands stay fast; a plugin
    command never replaces a core one."""
