"""Python CPU per proxied HTTP request of pylium's L7 proxy, without sockets: one
`pylium.l7.proxy.Connection` with fake transports, fed a wrk-like request and an nginx-like
response in turn (allowed by an HTTP rule, both flow records made). What is left when the
kernel, uvloop and the other processes are taken away: the number to cut when making the
proxy cheaper (`bench_l7_http.py` measures the real thing).

    .venv/bin/python bench/l7_proxy_cpu.py [--requests N] [--connections N] [--profile] [--floor]

The bytes reach the proxy as the event loop hands them over: through each protocol's
`data_received` as looked up after `connection_made`. With `--connections N` (default 1)
they come in event-loop rounds as under load: a request on each of N connections, the
round's end, a response on each, the round's end (at 100: the round writes of
`pylium.l7.proxy.ROUND_BATCH`, as `bench_l7_http.py --connections 100` has them).
Prints the best of 7 runs in microseconds of process CPU per request+response; with
`--profile`, one cProfile'd run (function-call overhead inflates it) sorted by own time;
with `--floor`, the same for the bench's floor proxy (`l7_floor_proxy.py`: httptools on
every message, no policy, flows or metrics) measured alike, as the reference.
Compare two trees: `PYTHONPATH=OTHER/core:OTHER/plugins/l7_http .venv/bin/python ...`."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from pylium.l7 import proxy as proxy_module
from pylium_l7_http.parser import HttpParserFactory

REQUEST = b"GET /x HTTP/1.1\r\nHost: 10.0.0.2:80\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 05:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"
            b"ok\n")
POLICY = {"endpoints": [{"ipv4": "10.0.0.2", "ep_id": 1, "identity": 1000, "entries": [
    {"identity": 0, "direction": "ingress", "protocol": 6, "port": 80, "port_prefix_len": 16,
     "grants": [{"rule": "r", "kind": "http", "rules": [{"method": "GET", "path": "/x"}]}]}]}]}


class FakeSocket:
    def __init__(self, port: int = 40000) -> None:
        self.port = port

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return ("10.0.0.2", 80)

    def getpeername(self) -> tuple[str, int]:
        return ("10.0.0.1", self.port)


class FakeTransport:
    """What `Connection` calls of an asyncio transport; writes are counted, not sent."""

    def __init__(self, port: int = 40000) -> None:
        self.written = 0
        self.port = port

    def get_extra_info(self, name: str) -> FakeSocket:
        return FakeSocket(self.port)

    def set_protocol(self, protocol: object) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 65536)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def measure(requests: int, connections: int, profile: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="l7-proxy-cpu-") as state:
        proxy = proxy_module.Proxy(Path(state), HttpParserFactory(), {"ingress": 1}, "0")
        proxy.policy.load(POLICY)
        sides = []  # per connection: (the client's data_received, the upstream's)
        for i in range(connections):
            down = proxy_module._Downstream(proxy, "ingress", 1)
            down.connection_made(FakeTransport(40000 + i))
            conn = down.conn
            conn.up, conn.up_state = FakeTransport(), "open"
            sides.append((down.data_received, proxy_module._Upstream(conn).data_received))
        rounds = max(1, requests // connections)

        def run(rounds: int) -> None:
            for _ in range(rounds):
                for request, _response in sides:
                    request(REQUEST)
                if proxy.in_round:  # the loop's round ends
                    proxy.write_round()
                for _request, response in sides:
                    response(RESPONSE)
                if proxy.in_round:
                    proxy.write_round()
        run(max(1, 100 // connections))  # warm up (and the upstream is open)
        warm = proxy.seq
        profiler = cProfile.Profile() if profile else None
        best = float("inf")
        for _ in range(1 if profile else 7):
            started = time.process_time()
            if profiler:
                profiler.enable()
            run(rounds)
            if profiler:
                profiler.disable()
            best = min(best, time.process_time() - started)
        done = rounds * connections
        assert proxy.seq - warm == 2 * done * (1 if profile else 7), "a flow is missing"
        print(f"{best / done * 1e6:.2f} us CPU per request+response "
              f"({connections} connection(s), {proxy.seq} flow records)")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def measure_floor(requests: int) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import l7_floor_proxy as floor

    down = floor.Downstream()
    down.transport, down.up = FakeTransport(), FakeTransport()
    up = floor.Upstream(down)
    best = float("inf")
    for _ in range(7):
        started = time.process_time()
        for _ in range(requests):
            down.data_received(REQUEST)
            up.data_received(RESPONSE)
        best = min(best, time.process_time() - started)
    print(f"{best / requests * 1e6:.2f} us CPU per request+response (floor proxy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=1,
                        help="connections taking turns in event-loop rounds")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--floor", action="store_true",
                        help="also the floor proxy's cost, measured alike")
    args = parser.parse_args()
    asyncio.run(measure(args.requests, args.connections, args.profile))
    if args.floor:
        measure_floor(args.requests)


if __name__ == "__main__":
    main()
