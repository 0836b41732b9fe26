"""wireguard-go's configuration socket: the cross-platform UAPI of `wg(8)` (key=value lines,
`get=1` / `set=1`, answered with `errno=N`), spoken directly over the unix socket
`/var/run/wireguard/<device>.sock`. Keys travel as hex there and as base64 everywhere else
(`wg`, node records)."""

from __future__ import annotations

import base64
import binascii
import socket
from pathlib import Path
from typing import Any

from pylium.errors import PyliumError

SOCKET_DIR = Path("/var/run/wireguard")
TIMEOUT = 5.0


class UapiError(PyliumError):
    """The device refused a request, or its socket does not answer."""


def socket_path(device: str) -> Path:
    return SOCKET_DIR / f"{device}.sock"


def b64_to_hex(key: str) -> str:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise UapiError(f"not a WireGuard key (32 bytes, base64): {key!r}")
    return raw.hex()


def hex_to_b64(key: str) -> str:
    return base64.b64encode(bytes.fromhex(key)).decode()


def live(device: str) -> bool:
    """Does a wireguard-go answer on `device`'s socket (in any network namespace: the socket
    directory is shared by every namespace of this host)?"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(socket_path(device)))
        return True
    except OSError:
        return False


def _request(device: str, text: str) -> list[str]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(socket_path(device)))
            sock.sendall(text.encode())
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise UapiError(f"WireGuard device {device}: {socket_path(device)}: "
                        f"{exc.strerror or exc}") from None
    lines = data.decode().strip("\n").split("\n") if data.strip() else []
    errno_lines = [line for line in lines if line.startswith("errno=")]
    if not errno_lines:
        raise UapiError(f"WireGuard device {device}: no answer on its socket")
    code = int(errno_lines[-1].split("=", 1)[1])
    if code != 0:
        raise UapiError(f"WireGuard device {device} refused the request (errno {code})")
    return [line for line in lines if not line.startswith("errno=")]


def get(device: str) -> dict[str, Any]:
    """The device's configuration and counters: `private_key`/`public_key` (base64, the
    public one derived by us is not in the answer), `listen_port`, and `peers`, each with
    `public_key` (base64), `endpoint`, `allowed_ips`, `last_handshake` (UNIX seconds, 0 =
    never), `rx_bytes`, `tx_bytes`."""
    config: dict[str, Any] = {"peers": []}
    peer: dict[str, Any] | None = None
    for line in _request(device, "get=1\n\n"):
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = {"public_key": hex_to_b64(value), "endpoint": "", "allowed_ips": [],
                    "last_handshake": 0.0, "rx_bytes": 0, "tx_bytes": 0}
            config["peers"].append(peer)
        elif peer is None:
            if key == "private_key":
                config["private_key"] = hex_to_b64(value)
            elif key == "listen_port":
                config["listen_port"] = int(value)
            elif key == "fwmark":
                config["fwmark"] = int(value)
        elif key == "endpoint":
            peer["endpoint"] = value
        elif key == "allowed_ip":
            peer["allowed_ips"].append(value)
        elif key == "last_handshake_time_sec":
            peer["last_handshake"] += int(value)
        elif key == "last_handshake_time_nsec":
            peer["last_handshake"] += int(value) / 1e9
        elif key in ("rx_bytes", "tx_bytes"):
            peer[key] = int(value)
    return config


def set_(device: str, lines: list[str]) -> None:
    """One `set=1` transaction (the device applies all of it or reports an error)."""
    _request(device, "set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")


def peer_lines(public_key: str, endpoint: str, allowed_ips: list[str]) -> list[str]:
    """Add or update one peer, its allowed IPs replaced by exactly `allowed_ips`."""
    return [f"public_key={b64_to_hex(public_key)}", f"endpoint={endpoint}",
            "replace_allowed_ips=true", *(f"allowed_ip={ip}" for ip in allowed_ips)]


def remove_peer_lines(public_key: str) -> list[str]:
    return [f"public_key={b64_to_hex(public_key)}", "remove=true"]
