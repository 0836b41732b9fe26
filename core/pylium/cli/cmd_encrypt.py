"""`pylium encrypt status|rotate`: transparent encryption as `cilium-dbg encrypt status`
shows it (mode, interface, public key, peers with handshake age and bytes)."""

from __future__ import annotations

import click

from pylium.cli.client import client_from
from pylium.cli.output import emit, output_option


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s ago"
    return f"{seconds // 60}m{seconds % 60}s ago"


def status_text(s: dict) -> str:
    if not s.get("enabled"):
        return "Encryption: Disabled"
    lines = [f"Encryption: {s['mode'].capitalize()}"
             + (f" ({s['implementation']})" if s.get("implementation") else "")]
    if s.get("interface"):
        lines.append(f"Interface: {s['interface']}")
    lines += [f"\tPublic key: {s.get('public_key') or '-'}"
              + ("" if s.get("key_published", True) else " (withheld: not published)"),
              f"\tListening port: {s.get('port', '-')}",
              f"\tMTU: {s.get('mtu', '-')} (pod overhead {s.get('mtu_overhead', '-')})",
              f"\tPlaintext to nodes without key: "
              f"{'allowed' if s.get('allow_plaintext') else 'dropped'}",
              f"\tNumber of peers: {len(s.get('peers', []))}"]
    for peer in s.get("peers", []):
        lines += [f"\tPeer: {peer['node'] or '(unknown node)'} {peer['public_key']}",
                  f"\t\tEndpoint: {peer['endpoint'] or '-'}",
                  f"\t\tAllowed IPs: {', '.join(peer['allowed_ips']) or '-'}",
                  f"\t\tLatest handshake: {_age(peer['handshake_age_seconds'])}",
                  f"\t\tTransfer: {peer['rx_bytes']} B received, {peer['tx_bytes']} B sent"]
    for name in s.get("nodes_without_key", []):
        lines.append(f"\tNode without key: {name}")
    for name, error in s.get("errors", {}).items():
        lines.append(f"\tError: {name}: {error}")
    if s.get("error"):
        lines.append(f"\tError: {s['error']}")
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    @cli.group("encrypt")
    def encrypt_group() -> None:
        """Transparent node-to-node encryption (WireGuard)."""

    @encrypt_group.command("status")
    @output_option
    @click.pass_context
    def encrypt_status(ctx, output: str):
        """Encryption mode, interface, public key and peers of this node."""
        emit(client_from(ctx).get("/v1/encrypt"), output, status_text)

    @encrypt_group.command("rotate")
    @output_option
    @click.pass_context
    def encrypt_rotate(ctx, output: str):
        """Replace this node's key; the new public key is published and peers follow."""
        emit(client_from(ctx).post("/v1/encrypt/rotate"), output, status_text)
