"""`pylium bpf policy get | ipcache list | ct list | metrics list | endpoint list | lb list |
lb maglev list`: what
the kernel holds, like `cilium bpf ...` (asks the agent)."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option


def _policy_table(d):
    rows = [[e["verdict"].capitalize(), e["direction"].capitalize(),
             "ANY" if e["identity"] == 0 else e["identity"],
             "ANY" if e["protocol"] == "ANY" else
             (f"{e['port_range'][0]}-{e['port_range'][1]}/{e['protocol']}"
              if e["port_range"][0] != e["port_range"][1]
              else f"{e['port']}/{e['protocol']}"),
             e["proxy_port"] or "NONE"] for e in d["entries"]]
    title = (f"endpoint {d['ep_id']}  revision {d.get('revision')}  enforced: "
             f"ingress={d.get('ingress_enforced')} egress={d.get('egress_enforced')}")
    return make_table(["POLICY", "DIRECTION", "IDENTITY", "PORT/PROTO", "PROXY PORT"], rows,
                      title=title)


def _ipcache_table(rows):
    return make_table(["IP PREFIX/ADDRESS", "IDENTITY", "TUNNEL ENDPOINT"],
                      [[r["cidr"], r["identity"], r["tunnel_endpoint"] or "0.0.0.0"] for r in rows])


def _ct_table(rows):
    def port(p, r):
        return "" if r["protocol"] == "ICMP" else f":{p}"

    return make_table(
        ["FLOW", "DIR", "EP", "SRC IDENTITY", "EXPIRES", "PACKETS", "BYTES", "FLAGS"],
        [[f"{r['protocol']} {r['src']}{port(r['sport'], r)} -> {r['dst']}{port(r['dport'], r)}",
          r["direction"].upper(), r["ep_id"], r["src_identity"],
          "expired" if r["expired"] else f"{r['expires_in_s']}s", r["packets"], r["bytes"],
          ",".join(f for f, on in (("SeenReply", r["seen_reply"]), ("Closing", r["closing"])) if on)]
         for r in rows])


def _metrics_table(rows):
    return make_table(["REASON", "DIRECTION", "PACKETS", "BYTES"],
                      [[r["reason_desc"], r["direction"].upper(), r["packets"], r["bytes"]]
                       for r in rows])


def _endpoint_table(rows):
    return make_table(["IP ADDRESS", "ENDPOINT", "IDENTITY", "IFINDEX", "MAC", "HOST MAC"],
                      [[r["ipv4"], r["ep_id"], r["identity"], r["ifindex"], r["ep_mac"],
                        r["host_mac"]] for r in rows])


def _lb_table(rows):
    out = []
    for r in rows:
        out.append([r["frontend"], f"0 (id {r['id']}) [{r['algorithm']}"
                    + (f", affinity {r['affinity_timeout']}s" if r["affinity_timeout"] else "")
                    + "]"])
        out += [["", f"{b['slot']} => {b['address'] or '?'} (backend {b['backend_id']}, "
                 f"{b['state']})"] for b in r["backends"]]
    return make_table(["SERVICE ADDRESS", "BACKEND ADDRESS (SLOT)"], out)


def _maglev_table(rows):
    return make_table(["ID", "FRONTEND", "TABLE SIZE", "SLOTS PER BACKEND ID"],
                      [[r["id"], r["frontend"], r["table_size"],
                        ", ".join(f"{k}: {v}" for k, v in r["backend_slots"].items())]
                       for r in rows])


def register(cli: click.Group) -> None:
    @cli.group("bpf")
    def bpf() -> None:
        """Inspect the BPF maps the datapath runs on."""

    @bpf.group("policy")
    def policy() -> None:
        """Per-endpoint policy maps."""

    @policy.command("get")
    @click.argument("ep_id", type=int)
    @output_option
    @click.pass_context
    def policy_get(ctx, ep_id: int, output: str) -> None:
        """The policy map loaded for endpoint EP_ID."""
        emit(client_from(ctx).get(f"/v1/bpf/policy/{ep_id}"), output, _policy_table)

    def lister(group_name: str, path: str, table, doc: str) -> None:
        @bpf.group(group_name, help=doc)
        def group() -> None:
            pass

        @group.command("list", help=doc)
        @output_option
        @click.pass_context
        def list_(ctx, output: str) -> None:
            emit(client_from(ctx).get(path), output, table)

    lister("ipcache", "/v1/bpf/ipcache", _ipcache_table, "IP prefix -> identity entries.")
    lister("ct", "/v1/bpf/ct", _ct_table, "Connection-tracking entries.")
    lister("metrics", "/v1/bpf/metrics", _metrics_table,
           "Datapath packet/byte counters by reason and direction.")
    lister("endpoint", "/v1/bpf/endpoints", _endpoint_table, "Local endpoints map.")

    @bpf.group("lb")
    def lb() -> None:
        """Service load-balancing maps."""

    @lb.command("list")
    @output_option
    @click.pass_context
    def lb_list(ctx, output: str) -> None:
        """Frontends and their backend slots (`cilium bpf lb list`)."""
        emit(client_from(ctx).get("/v1/bpf/lb"), output, _lb_table)

    @lb.group("maglev")
    def maglev() -> None:
        """Maglev lookup tables."""

    @maglev.command("list")
    @output_option
    @click.pass_context
    def maglev_list(ctx, output: str) -> None:
        """Each Maglev service's lookup table (table output: slots per backend id)."""
        emit(client_from(ctx).get("/v1/bpf/lb/maglev"), output, _maglev_table)
