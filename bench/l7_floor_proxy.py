"""The floor of issue 11's prescribed stack: the least a transparent HTTP/1.1 reverse proxy
built on uvloop + asyncio Protocols + httptools can do per request. Bench-only
(`bench_l7_http.py` runs it as the `floor` side); it is NOT a baseline and not a product.

Per client connection: the accepted socket is IP_TRANSPARENT (TPROXY'd like pylium's
proxy, so its local address is the original destination), one upstream connection to that
destination is opened on the first request and kept while the client keeps its connection
(pylium's model). Every request and every response is parsed by httptools (llhttp, its
callbacks as a proxy needs them: URL, header fields, end of message) and forwarded as
read. No policy, no flow records, no metrics, no backpressure refinements beyond asyncio's:
what remains is the stack's own cost per request.

    python bench/l7_floor_proxy.py --port 10090     (several share the port: SO_REUSEPORT)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

import httptools
import uvloop

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)


class _Parse:
    """httptools callbacks: what a proxy must see of each message (its URL and headers,
    where it ends)."""

    __slots__ = ("url", "headers", "messages")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.messages = 0

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.messages += 1


class Upstream(asyncio.Protocol):
    def __init__(self, down: Downstream) -> None:
        self.down = down
        self.parse = _Parse()
        self.parser = httptools.HttpResponseParser(self.parse)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.down.transport.abort()
            return
        self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.transport.close()


class Downstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.parse = _Parse()
        self.parser = httptools.HttpRequestParser(self.parse)
        self.up: asyncio.Transport | None = None
        self.pending: list[bytes] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dst = sock.getsockname()[:2]  # the original destination (transparent)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()
            return
        if self.up is not None:
            self.up.write(data)
        elif self.pending is not None:
            self.pending.append(data)
        else:
            self.pending = [data]
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            up, _ = await loop.create_connection(lambda: Upstream(self), *self.dst)
        except OSError:
            self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()
            return
        self.up = up
        up.write(b"".join(self.pending))
        self.pending = None

    def eof_received(self) -> bool:
        if self.up is not None and self.up.can_write_eof():
            self.up.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def serve(port: int, bind: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind((bind, port))
    sock.listen(1024)
    sock.setblocking(False)
    server = await loop.create_server(Downstream, sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    os.write(1, b"ready\n")
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.bind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
