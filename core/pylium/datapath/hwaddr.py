"""An interface's MAC address by ifindex in the calling thread's network namespace.

The datapath checks it before it attaches to or detaches from an ifindex: the same number
in another namespace is another interface. One ioctl, no netlink socket: it runs for every
endpoint on each re-adoption."""

from __future__ import annotations

import fcntl
import socket
import struct

SIOCGIFHWADDR = 0x8927


def interface_mac(ifindex: int) -> str | None:
    """MAC address of `ifindex` in the calling thread's netns, or None if there is none."""
    try:
        name = socket.if_indextoname(ifindex)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return ":".join(f"{b:02x}" for b in raw[18:24])
