"""`lb_client.py tcp|udp IP PORT COUNT [SPORT]`: COUNT new connections (or connected UDP sockets,
each from a new source port) to IP:PORT; prints one line per answer: "NAME PEER_IP", or
"ERR <reason>". A connected socket accepts answers only from IP:PORT, so every answer
proves the reply carried the service address as its source."""

from __future__ import annotations

import socket
import sys


def once(proto: str, ip: str, port: int, sport: int = 0) -> str:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(2)
        try:
            if sport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", sport))
            sock.connect((ip, port))
            if proto == "udp":
                sock.send(b"hi")
                data = sock.recv(256)
            else:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    data += chunk
            peer = sock.getpeername()
            if peer != (ip, port):
                return f"ERR peer {peer}"
            return data.decode().strip() or "ERR empty"
        except OSError as exc:
            detail = f" errno {exc.errno}" if type(exc) is OSError else ""  # which one
            return f"ERR {type(exc).__name__}{detail}"


def main() -> None:
    proto, ip, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sport = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    for _ in range(count):
        print(once(proto, ip, port, sport), flush=True)


if __name__ == "__main__":
    main()
