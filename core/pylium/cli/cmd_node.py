"""`pylium node list | ipcache | identities`: the cluster as this agent sees it."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option


def _nodes_table(nodes):
    return make_table(
        ["NAME", "IPV4 ADDRESS", "POD CIDR", "ROUTING", "LABELS", "SOURCE"],
        [[n["name"], n["ipv4"], n["pod_cidr"], n.get("routing_mode", ""),
          ",".join(f"{k}={v}" for k, v in sorted(n.get("labels", {}).items())) or "-",
          ",".join(n.get("sources") or ["local" if n.get("local") else "kvstore"])]
         for n in nodes])


def _ipcache_text(report):
    table = make_table(["IP", "IDENTITY", "TUNNEL ENDPOINT", "NODE"],
                       [[e["ip"], e["identity"], e["tunnel_endpoint"] or "-", e["node"]]
                        for e in report["entries"]])
    problems = {k: report[k] for k in ("missing", "stale", "different") if report[k]}
    summary = (f"{report['ipcache']} remote entries in the ipcache, {report['store']} in the "
               "store: " + ("in sync" if not problems else
                            "; ".join(f"{k}: {', '.join(v)}" for k, v in problems.items())))
    from rich.console import Group
    from rich.text import Text

    return Group(table, Text(summary))


def _identities_table(identities):
    return make_table(["ID", "LABELS", "REFERENCED BY"],
                      [[i["id"], ", ".join(i["labels"]), ", ".join(i["references"]) or "-"]
                       for i in identities])


def register(cli: click.Group) -> None:
    @cli.group("node")
    def node() -> None:
        """Cluster nodes (registered in the KV store by their agents, or known to the
        orchestrator: Kubernetes Node objects)."""

    @node.command("list")
    @output_option
    @click.pass_context
    def node_list(ctx, output: str) -> None:
        """Every node this agent knows (KV store, Kubernetes), this one included."""
        emit(client_from(ctx).get("/v1/cluster/nodes"), output, _nodes_table)

    @node.command("ipcache")
    @output_option
    @click.pass_context
    def node_ipcache(ctx, output: str) -> None:
        """Remote endpoints in this node's ipcache, checked against the KV store."""
        emit(client_from(ctx).get("/v1/cluster/ipcache"), output, _ipcache_text)

    @node.command("identities")
    @output_option
    @click.pass_context
    def node_identities(ctx, output: str) -> None:
        """Cluster-wide identities in the KV store and which nodes reference them."""
        emit(client_from(ctx).get("/v1/cluster/identities"), output, _identities_table)
