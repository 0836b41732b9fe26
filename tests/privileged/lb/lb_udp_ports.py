"""`lb_udp_ports.py serve PORT COUNT`: answers UDP datagrams on PORT..PORT+COUNT-1 with the
port that received them (many backends in one process).
`lb_udp_ports.py flows IP PORT SPORT COUNT`: one datagram to IP:PORT from each source port
SPORT..SPORT+COUNT-1 on a connected socket; prints "SPORT ANSWER" ("SPORT ERR" on none). A
connected socket accepts answers only from IP:PORT: each answer was reverse-NATed."""

from __future__ import annotations

import selectors
import socket
import sys


def serve(port: int, count: int) -> None:
    sel = selectors.DefaultSelector()
    for p in range(port, port + count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", p))
        sel.register(sock, selectors.EVENT_READ, p)
    while True:
        for key, _ in sel.select():
            _data, peer = key.fileobj.recvfrom(2048)
            key.fileobj.sendto(str(key.data).encode(), peer)


def flows(ip: str, port: int, sport: int, count: int) -> None:
    for s in range(sport, sport + count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(1)
            sock.bind(("0.0.0.0", s))
            sock.connect((ip, port))
            try:
                sock.send(b"hi")
                answer = sock.recv(64).decode()
            except OSError:
                answer = "ERR"
            print(s, answer, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        flows(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
