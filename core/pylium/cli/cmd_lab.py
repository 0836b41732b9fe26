"""`pylium lab up | status | exec | add-pod | down`: nodes and pods as network namespaces."""

from __future__ import annotations

import subprocess
import sys

import click
import yaml

from pylium.cli.output import emit, make_table, output_option
from pylium.errors import UserError


def _lab(ctx):
    from pylium.lab.lab import Lab

    return Lab(ctx.find_object(dict)["lab"])


def _status_table(status):
    rows = [["node", n["name"], n["ip"], f"pod CIDR {n['pod_cidr']}",
             "agent running" if n["agent_running"] else "AGENT DOWN"] for n in status["nodes"]]
    rows += [["pod", p["name"], p["ip"], f"on {p['node']} (endpoint {p['endpoint_id']})",
              ",".join(f"{k}={v}" for k, v in p["labels"].items())] for p in status["pods"]]
    return make_table(["KIND", "NAME", "IP", "WHERE", "INFO"], rows,
                      title=f"lab {status['name']}")


def _settings(pairs: tuple[str, ...]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--agent-setting: {pair!r} is not KEY=VALUE")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def register(cli: click.Group) -> None:
    @cli.group("lab")
    @click.option("--name", default="pyl", envvar="PYLIUM_LAB", show_default=True,
                  help="Lab name: prefix of every netns, socket and state path it makes.")
    @click.pass_context
    def lab_group(ctx, name: str) -> None:
        """A local lab: nodes and pods as network namespaces on this host."""
        ctx.ensure_object(dict)["lab"] = name

    @lab_group.command("up")
    @click.option("--nodes", default=1, show_default=True, help="How many node namespaces.")
    @click.option("--demo", type=click.Choice(["starwars", "starwars-l7"]),
                  help="Create the demo's pods (starwars-l7: also run the HTTP L7 proxy and "
                  "import the L7 rule1).")
    @click.option("--agent-setting", "settings", multiple=True, metavar="KEY=VALUE",
                  help="Extra agent config setting (e.g. ct_timeout_tcp=10); repeatable.")
    @click.option("--routing", help="Routing mode plugin for cross-node traffic "
                  "(vxlan, geneve, native); with several nodes the agents share one "
                  "embedded KV store.")
    @click.option("--kvstore", type=click.Choice(["embedded", "etcd"]), default="embedded",
                  show_default=True, help="Cluster store: one embedded SQLite file the node "
                  "agents share, or a real etcd in the lab's own namespace.")
    @click.option("--encryption", help="Encryption plugin for pod traffic between nodes "
                  "(wireguard); the same as --agent-setting encryption=NAME.")
    @output_option
    @click.pass_context
    def lab_up(ctx, nodes: int, demo: str | None, settings: tuple[str, ...], output: str,
               routing: str | None, kvstore: str, encryption: str | None):
        """Create the lab's namespaces and start one agent per node."""
        subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
                       shell=True, check=False)
        agent_settings = _settings(settings)
        if encryption:
            agent_settings["encryption"] = encryption
        emit(_lab(ctx).up(nodes=nodes, demo=demo, agent_settings=agent_settings,
                          routing=routing, kvstore=kvstore),
             output, _status_table)

    @lab_group.command("status")
    @output_option
    @click.pass_context
    def lab_status(ctx, output: str):
        """Nodes and pods with their addresses and labels."""
        emit(_lab(ctx).status(), output, _status_table)

    @lab_group.command("add-pod")
    @click.argument("name")
    @click.option("-l", "--label", "labels", multiple=True, metavar="KEY=VALUE")
    @click.option("--node", help="Node to place the pod on (default: the first).")
    @click.option("--namespace", default="default", show_default=True)
    @output_option
    @click.pass_context
    def lab_add_pod(ctx, name, labels, node, namespace, output):
        """Add a pod (a netns wired by the node's agent)."""
        parsed = {k: str(v) for k, v in _settings(labels).items()}
        emit(_lab(ctx).add_pod(name, parsed, node=node, namespace=namespace), output)

    @lab_group.command("exec", context_settings={"ignore_unknown_options": True})
    @click.argument("target")
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED, required=True)
    @click.pass_context
    def lab_exec(ctx, target: str, argv: tuple[str, ...]):
        """Run a command in a pod's (or node's, or `world`'s) network namespace:
        `pylium lab exec tiefighter -- curl -s ...`. Exits with the command's code."""
        command = _lab(ctx).exec_argv(target, list(argv))
        sys.stdout.flush()
        ctx.exit(subprocess.run(command, check=False).returncode)

    @lab_group.command("down")
    @output_option
    @click.pass_context
    def lab_down(ctx, output: str):
        """Stop the agents and servers and remove every namespace, pin and state file."""
        result = _lab(ctx).down()
        emit(result, output, lambda r: f"lab {_lab(ctx).name}: "
             + ("removed" if r["removed"] else "was not up"))
