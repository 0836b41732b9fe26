"""`pylium routing status`: the routing mode, its tunnel/underlay and the nodes it routes to."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option


def _table(status: dict):
    rows = [["mode", status["mode"]],
            ["node", f"{status['node']['name']} {status['node']['ipv4']} "
                     f"pods {status['node']['pod_cidr']}"],
            ["underlay", f"{status['underlay']['ifname'] or '-'} mtu {status['underlay']['mtu']}"],
            ["pod mtu", f"{status['pod_mtu']} (overhead {status['mtu_overhead']})"]]
    for key in ("device", "port", "vni", "encapsulation"):
        if key in status:
            rows.append([key, str(status[key])])
    for node in status["nodes"]:
        rows.append(["remote node", f"{node['name']} {node['ipv4']} pods {node['pod_cidr']}"])
    for name, error in status.get("errors", {}).items():
        rows.append(["error", f"{name}: {error}"])
    return make_table(["", ""], rows, title="routing")


def register(cli: click.Group) -> None:
    @cli.group("routing")
    def routing_group() -> None:
        """Cross-node routing mode (vxlan, geneve, native, local)."""

    @routing_group.command("status")
    @output_option
    @click.pass_context
    def routing_status(ctx, output: str):
        """The agent's routing mode and the remote nodes it routes to."""
        emit(client_from(ctx).get("/v1/routing"), output, _table)
