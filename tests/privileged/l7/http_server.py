"""The HTTP server behind the proxy in the l7 tests (run inside the server netns):
HTTP/1.1 keep-alive, Content-Length and chunked bodies read in pieces (never whole),
`Expect: 100-continue`, every request it sees appended to a JSON-lines log.
`/reset` resets the connection instead of answering; `/big/N` answers N bytes."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes
    log_path = ""
    lock = threading.Lock()

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                n = int(line.split(b";")[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = n
                while left:
                    piece = self.rfile.read(min(left, 1 << 16))
                    digest.update(piece)
                    size += len(piece)
                    left -= len(piece)
                self.rfile.readline(16)
        else:
            left = int(self.headers.get("content-length") or 0)
            while left:
                piece = self.rfile.read(min(left, 1 << 16))
                if not piece:
                    break
                digest.update(piece)
                size += len(piece)
                left -= len(piece)
        return size, digest.hexdigest()

    def _handle(self) -> None:
        if self.path == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if self.path.startswith("/big/"):  # /big/N: N bytes of zeros, written in pieces
            total = int(self.path[5:])
            self.send_response(200)
            self.send_header("content-length", str(total))
            self.end_headers()
            piece = b"\0" * (1 << 16)
            left = total
            while left:
                self.wfile.write(piece[:min(left, len(piece))])
                left -= min(left, len(piece))
            return
        size, digest = self._body()
        with self.lock, open(self.log_path, "a") as log:
            log.write(json.dumps({"method": self.command, "path": self.path,
                                  "headers": dict(self.headers.items()),
                                  "body_size": size, "body_sha256": digest,
                                  "peer": self.client_address[0]}) + "\n")
        body = f"ok {self.command} {self.path} {size}\n".encode()
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def main() -> None:
    Handler.log_path = sys.argv[1]
    ThreadingHTTPServer.daemon_threads = True
    # a listen backlog for many connections opened at once (socketserver's default is 5:
    # the proxy's upstream connects of a burst of clients overflowed it, and a connection
    # the kernel dropped the handshake's ACK of waited seconds for retransmissions)
    ThreadingHTTPServer.request_queue_size = 1024
    servers = [ThreadingHTTPServer(("0.0.0.0", int(port)), Handler) for port in sys.argv[2:]]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
