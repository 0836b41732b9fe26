"""Answers every TCP connection and UDP datagram on PORT with "NAME PEER_IP" (so a test
sees which backend served it and which source address the backend saw)."""

from __future__ import annotations

import socket
import sys
import threading


def serve_tcp(name: str, port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(128)
    while True:
        conn, peer = srv.accept()
        with conn:
            conn.sendall(f"{name} {peer[0]}\n".encode())


def serve_udp(name: str, port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("0.0.0.0", port))
    while True:
        _data, peer = srv.recvfrom(2048)
        srv.sendto(f"{name} {peer[0]}\n".encode(), peer)


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    threading.Thread(target=serve_udp, args=(name, port), daemon=True).start()
    serve_tcp(name, port)


if __name__ == "__main__":
    main()
