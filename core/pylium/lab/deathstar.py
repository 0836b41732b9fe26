"""The Star Wars demo's deathstar service: a tiny HTTP server run inside the pod's netns.

`POST /v1/request-landing` answers "Ship landed" (Cilium's demo app); `PUT
/v1/exhaust-port` is the request the L7 policy exists to stop."""

from __future__ import annotations

import argparse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DeathstarHandler(BaseHTTPRequestHandler):
    server_version = "deathstar/1.0"
    #: keep-alive, as Cilium's demo app (a Go server) answers: http.server's default,
    #: HTTP/1.0, closes after every answer, so a client at load reconnects per request
    protocol_version = "HTTP/1.1"
    #: the headers and the body go out in two writes: with Nagle on, a kept-alive client
    #: waits for its delayed ACK (40 ms) before the body
    disable_nagle_algorithm = True

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self._drain()
        if self.path == "/v1/request-landing":
            self._answer(200, "Ship landed\n")
        else:
            self._answer(404, "Not found\n")

    def do_PUT(self) -> None:  # noqa: N802
        self._drain()
        if self.path == "/v1/exhaust-port":
            self._answer(503, "Panic: deathstar exploded\n")
        else:
            self._answer(404, "Not found\n")

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200 if self.path == "/v1" else 404,
                     "deathstar: POST /v1/request-landing\n" if self.path == "/v1"
                     else "Not found\n")

    def log_message(self, fmt: str, *args) -> None:
        pass  # quiet: the lab keeps no per-request logs


class DeathstarServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    #: socketserver's default backlog is 5: a few clients reconnecting at once overflowed it,
    #: and the kernel's dropped SYNs came back as 1 s (or, twice, 3 s) stalls
    request_queue_size = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--address", default="0.0.0.0")
    args = parser.parse_args()
    DeathstarServer((args.address, args.port), DeathstarHandler).serve_forever()


if __name__ == "__main__":
    main()
