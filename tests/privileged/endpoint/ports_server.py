"""Test helper run inside a netns: accept TCP on every port given, answer `ok <port>`."""

import socket
import sys
import threading


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        try:
            conn.sendall(f"ok {port}\n".encode())
        finally:
            conn.close()


ports = [int(p) for p in sys.argv[1:]]
for p in ports[1:]:
    threading.Thread(target=serve, args=(p,), daemon=True).start()
serve(ports[0])
