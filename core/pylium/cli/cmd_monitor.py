"""`pylium monitor [--type drop|trace|policy-verdict] [-o json]`: datapath events as they
happen, like `cilium monitor`.

By default the events come from the agent (which owns the ring buffer's single consumer
position). `--direct` reads the pinned ring buffer itself, for when no agent runs: two
readers of one BPF ring buffer split its records between them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pylium.errors import UserError

TYPES = {"drop": 1, "trace": 4, "policy-verdict": 5}  # Cilium monitor message types


def _ports(src: str, dst: str, sport, dport, proto: str) -> tuple[str, str]:
    if proto in ("TCP", "UDP", "SCTP"):
        return f"{src}:{sport}", f"{dst}:{dport}"
    return src, dst


def line_from_event(e: dict) -> str:
    """One raw datapath event (pylium.datapath.maps.events.decode) as a monitor line."""
    src, dst = _ports(e["saddr"], e["daddr"], e["sport"], e["dport"], e["protocol"])
    who = f"endpoint {e['ep_id']} ({e['direction']}), identity {e['src_identity']}->{e['dst_identity']}"
    if e["type"] == "drop":
        head = f"xx drop ({e['reason_desc']})"
    elif e["type"] == "trace":
        head = f"-> {e['observation_point']}"
    else:
        head = f"Policy verdict log: action {e['verdict']}" + (
            f" proxy-port {e['proxy_port']}" if e.get("proxy_port") else "")
    return f"{head} {who}: {src} -> {dst} {e['protocol'].lower()}"


def line_from_flow(f: dict) -> str:
    """A flow from the agent's stream (Hubble JSON) as a monitor line."""
    kind = (f.get("event_type") or {}).get("type")
    l4 = f.get("l4") or {}
    proto = next(iter(l4), "")
    ports = l4.get(proto, {}) if proto else {}
    ip = f.get("IP") or {}
    src, dst = ip.get("source", "?"), ip.get("destination", "?")
    if "source_port" in ports:
        src, dst = f"{src}:{ports['source_port']}", f"{dst}:{ports.get('destination_port')}"
    who = (f"{f.get('traffic_direction', '').lower()}, identity "
           f"{(f.get('source') or {}).get('identity')}->{(f.get('destination') or {}).get('identity')}")
    if kind == TYPES["drop"]:
        head = f"xx drop ({f.get('drop_reason_desc', f.get('drop_reason'))})"
    elif kind == TYPES["trace"]:
        head = f"-> {f.get('trace_observation_point', '')}"
    else:
        head = f"Policy verdict log: {f.get('verdict', '')}"
    return f"{head} {who}: {src} -> {dst} {proto.lower()} {f.get('Summary', '')}".rstrip()


def _direct(root: Path, wanted: set[str], output: str, count: int | None) -> None:
    from pylium.datapath.maps.events import decode
    from pylium.datapath.ringbuf import RingBufferReader

    ring = root / "events"
    if not ring.exists():
        raise UserError(f"--bpffs-root: no events ring buffer pinned at {ring}")
    reader = RingBufferReader.open_pinned(ring)
    seen = 0
    try:
        while count is None or seen < count:
            view = reader.poll(250)
            raw = bytes(view)
            for off in range(0, len(raw), 64):
                event = decode(raw[off:off + 64])
                if wanted and event["type"] not in wanted:
                    continue
                click.echo(json.dumps(event) if output == "json" else line_from_event(event))
                seen += 1
                if count is not None and seen >= count:
                    return
    finally:
        reader.close()


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--type", "types", multiple=True, type=click.Choice(sorted(TYPES)),
                  help="Only these event types (repeatable).")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
                  show_default=True)
    @click.option("--direct", is_flag=True,
                  help="Read the pinned ring buffer instead of asking the agent (no agent running).")
    @click.option("--bpffs-root", type=click.Path(path_type=Path), default=Path("/sys/fs/bpf/pylium"),
                  show_default=True, help="With --direct: the datapath's bpffs root.")
    @click.option("-n", "--count", type=int, default=None, help="Stop after this many events.")
    @click.pass_context
    def monitor(ctx, types, output, direct, bpffs_root, count) -> None:
        """Datapath events (drop, trace, policy-verdict) as they happen."""
        wanted = set(types)
        if direct:
            _direct(bpffs_root, wanted, output, count)
            return
        from pylium.cli.cmd_observe import stream_lines

        codes = {TYPES[t] for t in wanted}
        socket_path = ctx.find_root().obj["socket"]
        seen = 0
        for record in stream_lines(socket_path, "/v1/flows?follow=true", None):
            flow = record.get("flow", record)
            kind = (flow.get("event_type") or {}).get("type")
            if kind is None or (codes and kind not in codes):
                continue
            click.echo(json.dumps(flow) if output == "json" else line_from_flow(flow))
            seen += 1
            if count is not None and seen >= count:
                return


