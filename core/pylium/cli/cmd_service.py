"""`pylium service list | get | add | delete`: services in Cilium's shape (asks the agent;
the agent stores them in the KV store, so every node gets them)."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option
from pylium.lb.model import TYPES


def _frontend(spec) -> str:
    fe = spec["frontend-address"]
    return f"{fe['ip']}:{fe['port']}/{fe['protocol']}"


def service_table(services):
    """Cilium's columns; one line per backend (`1 => 10.200.1.2:80/TCP (active)`)."""
    rows = []
    for entry in services:
        spec = entry["spec"]
        backends = [f"{i} => {b['ip']}:{b['port']}/{b['protocol']} ({b['state']})"
                    for i, b in enumerate(spec["backend-addresses"], start=1)]
        frontend = _frontend(spec)
        if spec["flags"].get("nodePort"):
            frontend += f"\n(node):{spec['flags']['nodePort']}/{spec['frontend-address']['protocol']}"
        rows.append([spec["id"], frontend, spec["flags"]["type"],
                     "\n".join(backends)])
    return make_table(["ID", "Frontend", "Service Type", "Backend"], rows)


def register(cli: click.Group) -> None:
    @cli.group("service")
    def service() -> None:
        """Load-balanced services (ClusterIP, NodePort): frontends and their backends."""

    @service.command("list")
    @output_option
    @click.pass_context
    def list_(ctx, output: str) -> None:
        """Every service this agent applies."""
        emit(client_from(ctx).get("/v1/service"), output, service_table)

    @service.command("get")
    @click.argument("name_or_id")
    @output_option
    @click.pass_context
    def get(ctx, name_or_id: str, output: str) -> None:
        """One service, by name or id."""
        emit(client_from(ctx).get(f"/v1/service/{name_or_id}"), output,
             lambda s: service_table([s]))

    @service.command("add")
    @click.option("--name", help="Service name (default: derived from the frontend).")
    @click.option("--frontend", required=True, help="VIP:PORT[/TCP|UDP]")
    @click.option("--backend", "backends", multiple=True, help="IP:PORT (repeatable).")
    @click.option("--type", "svc_type", type=click.Choice(TYPES),
                  default="ClusterIP", show_default=True)
    @click.option("--algorithm", type=click.Choice(["random", "maglev"]), default="random",
                  show_default=True, help="Backend selection.")
    @click.option("--affinity", type=click.IntRange(0, 86400), default=0,
                  help="ClientIP session affinity timeout in seconds (0 = none).")
    @click.option("--traffic-policy", type=click.Choice(["Cluster", "Local"]),
                  default="Cluster", show_default=True)
    @click.option("--node-port", type=click.IntRange(1, 65535), default=None,
                  help="Type NodePort: the port on every node's address.")
    @output_option
    @click.pass_context
    def add(ctx, name, frontend, backends, svc_type, algorithm, affinity, traffic_policy,
            node_port, output) -> None:
        """Create or update a service (`cilium service update` with a name)."""
        name = name or "svc-" + frontend.lower().replace(":", "-").replace("/", "-")
        body = {"frontend": frontend, "backends": list(backends), "type": svc_type,
                "algorithm": algorithm, "affinity_timeout": affinity,
                "traffic_policy": traffic_policy}
        if node_port:
            body["node_port"] = node_port
        emit(client_from(ctx).put(f"/v1/service/{name}", body), output,
             lambda s: service_table([s]))

    @service.command("delete")
    @click.argument("name_or_id")
    @click.pass_context
    def delete(ctx, name_or_id: str) -> None:
        """Delete a service by id or name."""
        removed = client_from(ctx).delete(f"/v1/service/{name_or_id}")
        click.echo(f"Service {removed['spec']['id']} deleted")
