"""A tiny transparent TCP listener standing in for the node's L7 proxy in redirect tests
(run in the node netns): accepts on 0.0.0.0:PORT with IP_TRANSPARENT, logs one JSON line
per connection (`sockname` = the original destination, `peername` = the client), connects
upstream to the original destination with SO_MARK = mark_encode_identity(identity of the
client) and relays bytes both ways. It judges nothing: the datapath is what is tested.

    redirect_listener.py PORT LOG [--egress-magic] [CLIENT_IP=IDENTITY ...]

--egress-magic marks with MARK_MAGIC_PROXY_EGRESS (the destination applies its own L7
ingress rules to the upstream again) instead of MARK_MAGIC_IDENTITY.
"""

from __future__ import annotations

import json
import socket
import sys
import threading

from pylium.datapath.marks import (
    MARK_MAGIC_IDENTITY,
    MARK_MAGIC_PROXY_EGRESS,
    mark_encode_identity,
)

IP_TRANSPARENT = 19
SO_MARK = 36


def log(path: str, **fields) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(fields) + "\n")


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve(conn: socket.socket, path: str, identities: dict[str, int], port: int,
          magic: int) -> None:
    sockname, peername = conn.getsockname(), conn.getpeername()
    if sockname[0].startswith("127."):  # a readiness probe, not a redirected connection
        conn.close()
        return
    identity = identities.get(peername[0], 2)
    up = socket.socket()
    up.setsockopt(socket.SOL_SOCKET, SO_MARK, mark_encode_identity(identity, magic))
    up.settimeout(3)
    try:
        up.connect(sockname)
    except OSError as exc:
        log(path, port=port, sockname=list(sockname), peername=list(peername),
            identity=identity, upstream=f"error: {exc}")
        conn.close()
        up.close()
        return
    up.settimeout(None)
    log(path, port=port, sockname=list(sockname), peername=list(peername),
        identity=identity, upstream="connected")
    back = threading.Thread(target=pump, args=(up, conn), daemon=True)
    back.start()
    pump(conn, up)
    back.join(10)
    conn.close()
    up.close()


def main() -> None:
    port, path, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    magic = MARK_MAGIC_PROXY_EGRESS if "--egress-magic" in rest else MARK_MAGIC_IDENTITY
    identities = {ip: int(i) for ip, i in (a.split("=") for a in rest if "=" in a)}
    srv = socket.socket()
    srv.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn, path, identities, port, magic), daemon=True).start()


if __name__ == "__main__":
    main()
