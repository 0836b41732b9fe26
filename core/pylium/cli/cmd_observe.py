"""`pylium observe`: flows from the agent, like `hubble observe`, and `pylium ui`: the service
map page on a loopback port. Filters are evaluated in the agent (passed as query
parameters); this module only streams, prints and relays."""

from __future__ import annotations

import json
import sys
from urllib.parse import urlencode

import click

from pylium.agent.client import AgentClient, UnixHTTPConnection
from pylium.cli.client import client_from
from pylium.errors import UserError

#: (option, query parameter, help)
MULTI_FILTERS = (
    ("--verdict", "verdict", "FORWARDED, DROPPED, REDIRECTED, AUDIT, TRANSLATED"),
    ("--pod", "pod", "[namespace/]pod-name prefix, either side"),
    ("--from-pod", "from_pod", "[namespace/]pod-name prefix, source"),
    ("--to-pod", "to_pod", "[namespace/]pod-name prefix, destination"),
    ("--label", "label", "label selector (k=v,k2!=v2,k3), either side"),
    ("--from-label", "from_label", "label selector, source"),
    ("--to-label", "to_label", "label selector, destination"),
    ("--service", "service", "[namespace/]service-name prefix, either side"),
    ("--from-service", "from_service", "[namespace/]service-name prefix, source (replies)"),
    ("--to-service", "to_service", "[namespace/]service-name prefix, destination"),
    ("--identity", "identity", "security identity, either side"),
    ("--from-identity", "from_identity", "security identity, source"),
    ("--to-identity", "to_identity", "security identity, destination"),
    ("--ip", "ip", "IP or CIDR, either side"),
    ("--from-ip", "from_ip", "IP or CIDR, source"),
    ("--to-ip", "to_ip", "IP or CIDR, destination"),
    ("--port", "port", "L4 port, either side"),
    ("--from-port", "from_port", "L4 port, source"),
    ("--to-port", "to_port", "L4 port, destination"),
    ("--protocol", "protocol", "tcp, udp, icmp, http, kafka, dns"),
    ("--http-method", "http_method", "HTTP method of L7 flows"),
    ("--http-path", "http_path", "regular expression on the HTTP path of L7 flows"),
    ("--http-status", "http_status", "HTTP status code (404) or prefix (5+) of L7 responses"),
    ("--traffic-direction", "traffic_direction", "ingress or egress"),
    ("--node-name", "node_name", "only flows observed on this node"),
)


def _add_filters(func):
    for opt, dest, text in reversed(MULTI_FILTERS):
        func = click.option(opt, dest, multiple=True, help=text)(func)
    return func


def build_query(options: dict) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for _opt, dest, _text in MULTI_FILTERS:
        if options.get(dest):
            params[dest] = list(options[dest])
    for name in ("since", "until", "last", "first"):
        if options.get(name) is not None:
            params[name] = [str(options[name])]
    if options.get("follow"):
        params["follow"] = ["true"]
    if options.get("all_nodes"):
        params["all_nodes"] = ["true"]
    return params


def stream_lines(socket_path: str, path: str, timeout: float | None):
    """Yield NDJSON records from the agent as they arrive (None timeout: follow forever)."""
    return AgentClient(socket_path).stream(path, timeout)


TABLE_COLUMNS = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")


def table_row(resp: dict) -> tuple[str, ...]:
    from pylium.flow.model import compact_time, endpoint_text, parse_rfc3339

    if "node_status" in resp:
        st = resp["node_status"]
        return ("", "", "", st.get("state_change", ""), ", ".join(st.get("node_names", [])),
                st.get("message", ""))
    if "lost_events" in resp:
        lost = resp["lost_events"]
        return ("", "", "", "EVENTS LOST", lost["source"], str(lost["num_events_lost"]))
    f = resp["flow"]
    l4 = f.get("l4", {})
    proto = next(iter(l4), "")
    ports = l4.get(proto, {}) if proto in ("TCP", "UDP") else {}
    ip = f.get("IP", {})
    kind = {1: "drop", 4: "trace", 5: "policy-verdict"}.get(
        f.get("event_type", {}).get("type"), "")
    return (compact_time(parse_rfc3339(f["time"])),
            endpoint_text(f.get("source", {}), ip.get("source", ""), ports.get("source_port")),
            endpoint_text(f.get("destination", {}), ip.get("destination", ""),
                           ports.get("destination_port")),
            kind, f["verdict"], f.get("Summary", ""))


def register(cli: click.Group) -> None:
    register_observe(cli)
    register_ui(cli)


def register_observe(cli: click.Group) -> None:
    @cli.command()
    @click.option("-f", "--follow", is_flag=True, help="Follow flows as they happen.")
    @click.option("--all-nodes", is_flag=True,
                  help="Flows of every agent registered in the KV store, merged.")
    @click.option("--last", type=click.IntRange(min=0), default=None,
                  help="Last N flows (default 20 without --since/--follow).")
    @click.option("--first", type=click.IntRange(min=0), default=None,
                  help="First N flows in the agent's ring.")
    @click.option("--since", default=None, help="Flows since a duration ago (5m) or RFC 3339.")
    @click.option("--until", default=None, help="Flows until a duration ago or RFC 3339.")
    @_add_filters
    @click.option("-o", "--output", type=click.Choice(["compact", "json", "jsonpb", "table"]),
                  default="compact", show_default=True, help="Output format.")
    @click.option("--timeout", type=float, default=None,
                  help="Stop following after this many seconds without output.")
    @click.pass_context
    def observe(ctx, output, timeout, **options):
        """Observe flows (Hubble-compatible JSON with -o json)."""
        from pylium.flow.model import compact_line

        params = build_query(options)
        path = "/v1/flows"
        if params:
            path += "?" + urlencode(params, doseq=True)
        socket_path = client_from(ctx).socket_path
        follow = bool(options.get("follow"))
        lines = stream_lines(socket_path, path, timeout if follow else 60.0)
        if output == "table" and not follow:
            from pylium.cli.output import emit, make_table

            rows = [table_row(r) for r in lines]
            emit(rows, "table", lambda rs: make_table(TABLE_COLUMNS, rs))
            return
        if output == "table":
            click.echo("  ".join(TABLE_COLUMNS))
        for resp in lines:
            if output in ("json", "jsonpb"):
                text = json.dumps(resp, separators=(",", ":"))
            elif output == "table":
                text = "  ".join(table_row(resp))
            else:
                text = compact_line(resp)
            click.echo(text)
            if follow:
                sys.stdout.flush()


def _ui_proxy(socket_path: str, host: str, port: int):
    """An HTTP server on host:port that relays the service-map page and its data from the
    agent's socket (`/ui` → `/v1/ui`, `/ui/graph` → `/v1/ui/graph`)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    routes = {"/": "/v1/ui", "/ui": "/v1/ui", "/ui/graph": "/v1/ui/graph"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            target = routes.get(self.path.split("?", 1)[0])
            if target is None:
                self.send_error(404)
                return
            conn = UnixHTTPConnection(socket_path, 30.0)
            try:
                conn.request("GET", target)
                resp = conn.getresponse()
                body = resp.read()
                status, ctype = resp.status, resp.getheader("Content-Type", "text/plain")
            except OSError as exc:
                body, status, ctype = f"agent unreachable: {exc}".encode(), 502, "text/plain"
            finally:
                conn.close()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):
            pass

    return ThreadingHTTPServer((host, port), Handler)


def register_ui(cli: click.Group) -> None:
    @cli.command()
    @click.option("--port", type=click.IntRange(1, 65535), default=12000, show_default=True)
    @click.option("--address", default="127.0.0.1", show_default=True,
                  help="Listen address (loopback by default: the agent API is root-only).")
    @click.pass_context
    def ui(ctx, port: int, address: str):
        """Serve the service map page on http://ADDRESS:PORT/ui (relayed from the agent)."""
        socket_path = client_from(ctx).socket_path
        try:
            server = _ui_proxy(socket_path, address, port)
        except OSError as exc:
            raise UserError(f"port: cannot listen on {address}:{port}: {exc.strerror}") from None
        click.echo(f"service map on http://{address}:{port}/ui (Ctrl-C to stop)")
        try:
            server.serve_forever()
        finally:
            server.server_close()
