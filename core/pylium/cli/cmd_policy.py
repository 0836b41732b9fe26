"""`pylium policy validate | import | get | delete | trace`."""

from __future__ import annotations

from pathlib import Path

import attrs
import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option
from pylium.documents import decode_text
from pylium.errors import UserError
from pylium.policy.errors import PolicyError
from pylium.policy.load import load_file, load_files
from pylium.policy.trace import TraceQuery, trace


def _policies_table(data):
    return make_table(["KIND", "NAMESPACE", "NAME", "RULES", "DESCRIPTION"],
                      [[p["kind"], p["namespace"] or "-", p["name"], p["rules"],
                        p["description"]] for p in data["policies"]],
                      title=f"revision {data['revision']}")


def _capacity_table(data):
    return make_table(["ENDPOINT", "NAME", "IDENTITY", "ENTRIES", "CAPACITY", "FITS"],
                      [[e["endpoint_id"], e["name"], e["identity"], e["entries"],
                        e["capacity"], "yes" if e["fits"] else "NO"] for e in data["endpoints"]],
                      title=f"dry run: {len(data['would_import'])} policies, nothing imported")


def _trace_text(data) -> str:
    lines = [f"Verdict:  {data['verdict']}", f"Reason:   {data['reason']}",
             f"Rules:    {', '.join(data['rules']) or '-'}",
             f"Source:   identity {data['src_identity']['id']} "
             f"({', '.join(data['src_identity']['labels'])})",
             f"Dest:     identity {data['dst_identity']['id']} "
             f"({', '.join(data['dst_identity']['labels'])})"]
    for side in ("egress", "ingress"):
        d = data.get(side)
        if d is not None:
            lines.append(f"{side.capitalize() + ':':<10}{d['verdict']} - {d['reason']}"
                         + (f" [{', '.join(d['rules'])}]" if d["rules"] else ""))
    lines.append(f"Map state: {data['mapstate_verdict']}")
    dp = data.get("datapath")
    if dp is not None:
        if dp["verdict"] is None:
            lines.append("Datapath: not traced")
        else:
            lines.append(f"Datapath: {dp['verdict']} "
                         f"({'agrees' if dp['agrees'] else 'DISAGREES'} with {dp['expected']})")
        for side in ("egress", "ingress"):
            d = dp.get(side)
            if d is not None:
                reason = f", {d['drop_reason_desc']}" if d.get("drop_reason_desc") else ""
                action = ("forwarded (bpf_redirect to the peer)" if d["action"] == "redirected"
                          else f"to the L7 proxy on port {d['proxy_port']}"
                          if d["action"] == "to-proxy" else d["action"])
                lines.append(f"  {side} program of endpoint {d['endpoint']}: {action}"
                             f" (verdict {d['verdict']}, conntrack {d['ct']}{reason})")
        for note in dp.get("notes", []):
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def _echo_warnings(path: Path, warnings: list[dict]) -> None:
    """Accepted-but-not-enforced fields, on stderr so `-o json` stays parseable."""
    for w in warnings:
        click.echo(f"warning: {path}: {w['path']}: {w['message']}", err=True)


def register(cli: click.Group) -> None:
    @cli.group("policy")
    def policy() -> None:
        """CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and NetworkPolicy."""

    @policy.command("validate")
    @click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
    def validate(files: tuple[Path, ...]) -> None:
        """Check policy files offline; one `path: message` line per problem, and one
        `warning: ...` line per field accepted but not enforced yet (exit 0 for those)."""
        failed = False
        for path in files:
            try:
                policies = load_file(path)
            except PolicyError as exc:
                failed = True
                for line in exc.errors:
                    click.echo(line, err=True)
                continue
            _echo_warnings(path, [w.to_dict() for p in policies for w in p.warnings])
            rules = sum(len(p.rules) for p in policies)
            click.echo(f"{path}: valid ({len(policies)} policies, {rules} rules)")
        if failed:
            raise click.exceptions.Exit(1)

    @policy.command("import")
    @click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
    @click.option("--dry-run", is_flag=True,
                  help="Import nothing: show, per local endpoint, the policy-map entries the "
                       "result would need against the map's capacity (exit 1 if one would "
                       "overflow).")
    @output_option
    @click.pass_context
    def import_(ctx, file: Path, dry_run: bool, output: str) -> None:
        """Validate FILE and add its policies to the agent (replacing same-named ones)."""
        load_file(file)  # refuse locally first, with the file name in each message
        body = {"text": decode_text(file.read_bytes(), str(file)), "name": file.stem}
        if dry_run:
            data = client_from(ctx).post("/v1/policy?dry_run=true", body)
            _echo_warnings(file, data.get("warnings", []))
            emit(data, output, _capacity_table)
            if data["refused"]:
                click.echo(f"Error: {data['refused']}", err=True)
                raise click.exceptions.Exit(1)
            return
        data = client_from(ctx).post("/v1/policy", body)
        _echo_warnings(file, data.get("warnings", []))
        emit(data, output, lambda d: f"imported {len(d['imported'])} policies, "
                                     f"revision {d['revision']}")

    @policy.command("get")
    @click.argument("name", required=False)
    @click.option("--namespace", "-n")
    @output_option
    @click.pass_context
    def get(ctx, name: str | None, namespace: str | None, output: str) -> None:
        """List the agent's policies, or show one (NAME or NAMESPACE/NAME)."""
        client = client_from(ctx)
        if name is None:
            emit(client.get("/v1/policy"), output, _policies_table)
            return
        path = f"/v1/policy/{name}" + (f"?namespace={namespace}" if namespace else "")
        data = client.get(path)
        emit(data, output if output != "table" else "yaml")

    @policy.command("delete")
    @click.argument("name", required=False)
    @click.option("--namespace", "-n")
    @click.option("--all", "all_", is_flag=True, help="Delete every policy.")
    @output_option
    @click.pass_context
    def delete(ctx, name: str | None, namespace: str | None, all_: bool, output: str) -> None:
        """Delete the policy NAME (or NAMESPACE/NAME), or --all."""
        if bool(name) == all_:
            raise UserError("give a policy NAME or --all")
        query = "all=true" if all_ else f"name={name}" + (
            f"&namespace={namespace}" if namespace else "")
        data = client_from(ctx).delete(f"/v1/policy?{query}")
        emit(data, output, lambda d: f"deleted {len(d['deleted'])} policies, "
                                     f"revision {d['revision']}")

    @policy.command("trace")
    @click.option("--src", default="", help="Source endpoint labels: k=v,k2=v2.")
    @click.option("--dst", default="", help="Destination endpoint labels.")
    @click.option("--src-cidr", default="", help="Source IP outside the cluster.")
    @click.option("--dst-cidr", default="", help="Destination IP outside the cluster.")
    @click.option("--dport", type=int, required=True)
    @click.option("--proto", default="TCP", show_default=True)
    @click.option("--namespace", default="default", show_default=True,
                  help="Pod namespace of --src/--dst endpoints.")
    @click.option("--http-method", default="")
    @click.option("--http-path", default="")
    @click.option("--kafka-api-key", default="", help="Kafka request: api key (produce, "
                  "fetch, metadata, ... or a number).")
    @click.option("--kafka-api-version", type=int, default=0, show_default=True)
    @click.option("--kafka-client-id", default="")
    @click.option("--kafka-topic", default="", help="Topics of the Kafka request, a,b,...")
    @click.option("--policy-file", "policy_files", multiple=True,
                  type=click.Path(path_type=Path), help="Trace offline against these files.")
    @click.option("--enforcement", type=click.Choice(["default", "always", "never"]),
                  default="default", show_default=True, help="Offline enforcement mode.")
    @click.option("--datapath", "ask_datapath", is_flag=True,
                  help="Also run the loaded BPF programs on the packet (BPF_PROG_TEST_RUN) "
                       "for live endpoints with these labels.")
    @output_option
    @click.pass_context
    def trace_cmd(ctx, policy_files: tuple[Path, ...], enforcement: str, ask_datapath: bool,
                  output: str, **fields) -> None:
        """Would this packet (and HTTP or Kafka request) pass, and which rules decide?"""
        query = TraceQuery(**fields)
        if policy_files:
            if ask_datapath:
                raise UserError("--datapath asks the agent's loaded programs; "
                                "it cannot be combined with --policy-file")
            data = trace(query, load_files(policy_files), mode=enforcement).to_dict()
        else:
            data = client_from(ctx).post("/v1/policy/trace",
                                         {**attrs.asdict(query), "datapath": ask_datapath})
        emit(data, output, _trace_text)

