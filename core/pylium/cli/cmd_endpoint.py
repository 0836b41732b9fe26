"""`pylium endpoint list | get`: the agent's endpoints, like `cilium endpoint list`."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option

COLUMNS = ["ENDPOINT", "POLICY (ingress) ENFORCEMENT", "POLICY (egress) ENFORCEMENT",
           "IDENTITY", "LABELS (source:key[=value])", "IPv4", "STATUS"]


def _status(ep: dict) -> str:
    return ep["state"] if not ep.get("error") else f"{ep['state']}: {ep['error']}"


def _rows(endpoints: list[dict]) -> list[list[str]]:
    return [[str(ep["id"]),
             "Enabled" if ep["ingress_enforced"] else "Disabled",
             "Enabled" if ep["egress_enforced"] else "Disabled",
             str(ep["identity"]),
             "\n".join(ep["identity_labels"]),
             ep["ipv4"], _status(ep)] for ep in endpoints]


def _detail(ep: dict) -> str:
    lines = [f"{k + ':':<18}{v}" for k, v in (
        ("ID", ep["id"]), ("Name", f"{ep['namespace']}/{ep['name']}"), ("State", _status(ep)),
        ("Identity", ep["identity"]), ("IPv4", ep["ipv4"]),
        ("Interface", f"{ep['ifname']} (ifindex {ep['ifindex']}, {ep['mac']})"),
        ("Pod MAC", ep["pod_mac"]), ("Netns", ep["netns"]),
        ("Container", f"{ep['container_id']} ({ep['pod_ifname']})"
         if ep.get("container_id") else "-"),
        ("Ingress policy", "Enabled" if ep["ingress_enforced"] else "Disabled"),
        ("Egress policy", "Enabled" if ep["egress_enforced"] else "Disabled"),
        ("Policy revision", ep["policy_revision"]))]
    lines.append("Labels:")
    lines.extend(f"  {label}" for label in ep["identity_labels"])
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    @cli.group("endpoint")
    def endpoint_group() -> None:
        """Endpoints (pods) this agent manages."""

    @endpoint_group.command("list")
    @output_option
    @click.pass_context
    def endpoint_list(ctx, output: str) -> None:
        """Every endpoint with its identity, policy enforcement, IP and state."""
        emit(client_from(ctx).get("/v1/endpoint"), output,
             lambda eps: make_table(COLUMNS, _rows(eps)))

    @endpoint_group.command("get")
    @click.argument("endpoint")
    @output_option
    @click.pass_context
    def endpoint_get(ctx, endpoint: str, output: str) -> None:
        """One endpoint by id or name."""
        emit(client_from(ctx).get(f"/v1/endpoint/{endpoint}"), output, _detail)
