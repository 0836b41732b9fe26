"""Python CPU the AGENT spends per proxied HTTP request, without the proxy's sockets: the
control lines a real proxy (`pylium.l7.proxy.Proxy`, fake transports, the HTTP parser's
fast paths) makes for wrk-like requests and nginx-like responses over several connections
are captured, then sent from a thread over a unix socket to the agent's own path
(`ProxySupervisor._connect`: its reader, its acknowledgements; then the HTTP backend's
`_batch` — `_flows` for a tree without it —: proxy and Hubble metrics, the flow layer into
a flow ring of the agent's default size), with the agent's garbage-collector settings.
Enough requests to fill the ring: overwriting (freeing) old flows counts, as in the agent.

    .venv/bin/python bench/l7_agent_cpu.py [--requests N] [--connections N] [--batch N]
                                           [--profile]

Prints each run and the best of `--runs` in microseconds of the agent thread's CPU per
request (2 flow records; the sending thread's is not counted); with `--profile`, a
cProfile of a run with the ring full (function-call overhead inflates it) sorted by own
time. At 100 connections the proxy's lines hold ~1000 records (`--batch 1000`). Compare two
trees: `PYTHONPATH=OTHER/core:OTHER/plugins/l7_http .venv/bin/python COPY_OF_THIS_FILE ...`
(the proxy that makes the records is that tree's too; the copy needs `l7_proxy_cpu.py`
beside it). What it leaves out: the other processes' share of the CPUs and the caches they
leave cold (`bench_l7_http.py` measures those too)."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from l7_proxy_cpu import POLICY, REQUEST, RESPONSE, FakeTransport  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from pylium import gcpolicy  # noqa: E402
from pylium.api.context import L7Context  # noqa: E402
from pylium.api.node import NodeInfo  # noqa: E402
from pylium.flow.component import FlowObserver  # noqa: E402
from pylium.l7 import proxy as proxy_module  # noqa: E402
from pylium.l7.supervisor import ProxySupervisor  # noqa: E402
from pylium_l7_http.backend import L7Http  # noqa: E402
from pylium_l7_http.parser import HttpParserFactory  # noqa: E402


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class Capture:
    """The proxy's control writer: the lines are kept."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.transport = _Transport()

    def write(self, data: bytes) -> None:
        self.lines.append(data)

    def is_closing(self) -> bool:
        return False


class Peer:
    """A socket whose peer port differs per connection."""

    def __init__(self, port: int) -> None:
        self.port = port

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockname(self) -> tuple[str, int]:
        return ("10.0.0.2", 80)

    def getpeername(self) -> tuple[str, int]:
        return ("10.0.0.1", self.port)


class ConnTransport(FakeTransport):
    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def get_extra_info(self, name: str) -> Peer:
        return Peer(self.port)


def capture(requests: int, connections: int, batch: int) -> list[bytes]:
    """Control lines for `requests` request+response pairs, round-robin over
    `connections`, flushed every `batch` records (what FLOW_FLUSH_DELAY does under load)."""
    async def run() -> list[bytes]:
        with tempfile.TemporaryDirectory(prefix="l7-agent-cpu-") as state:
            proxy = proxy_module.Proxy(Path(state), HttpParserFactory(), {"ingress": 1}, "0")
            proxy.policy.load(POLICY)
            writer = Capture()
            proxy.controller = writer
            conns = []
            for i in range(connections):
                conn = proxy_module.Connection(proxy, "ingress", 1, ConnTransport(40000 + i))
                conn.up, conn.up_state = FakeTransport(), "open"
                conns.append(conn)
            for n in range(requests):
                conn = conns[n % connections]
                conn.received(conn.request, REQUEST)
                conn.received(conn.reply, RESPONSE)
                if proxy.in_round:  # the loop's round ends
                    proxy.write_round()
                if len(proxy.batch) >= batch:
                    proxy._flush_flows()
            proxy._flush_flows()
            return writer.lines
    return asyncio.run(run())


def agent() -> tuple[ProxySupervisor, list[int]]:
    """The bench's feeding agent (`bench_l7_http.feeding_agent`) behind a supervisor."""
    backend = L7Http.from_context(L7Context(
        name="http", node=NodeInfo("bench", "10.0.0.1", "10.0.0.0/24"),
        metrics=CollectorRegistry(), flows=FlowObserver("bench")))
    got = [0]

    def on_flows(messages: list) -> None:
        backend._flows(messages)
        got[0] += len(messages)
    extra = {}
    if hasattr(backend, "_batch"):  # protocol 4: batches as they came
        def on_batch(batch) -> None:
            backend._batch(batch)
            got[0] += len(batch.records)
        extra["on_batch"] = on_batch
    sup = ProxySupervisor(Path("/nonexistent"), "", {}, "0", on_flow=backend._flow,
                          on_flows=on_flows, **extra)
    return sup, got


def serve(path: str, lines: list[bytes], listening: threading.Event) -> None:
    """A proxy's control socket, in a thread: answers the agent's hello, sends the lines
    as fast as the agent takes them, ends, and drops the acknowledgements."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        listening.set()
        conn, _ = server.accept()
        with conn:
            hello = b""
            while not hello.endswith(b"\n"):
                hello += conn.recv(4096)
            conn.sendall(b'{"op":"hello"}\n')
            for line in lines:
                conn.sendall(line)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):
                pass


def feed(sup: ProxySupervisor, lines: list[bytes]) -> float:
    """The lines through the supervisor's own control connection (a unix socket, its
    reader, its acknowledgements); returns the CPU seconds of the agent's thread (the
    sending thread's are not counted)."""
    async def run() -> float:
        with tempfile.TemporaryDirectory(prefix="l7-agent-cpu-") as state:
            sup.state_dir = Path(state)
            listening = threading.Event()
            sender = threading.Thread(target=serve, args=(
                str(sup.state_dir / proxy_module.CONTROL_SOCKET), lines, listening))
            sender.start()
            listening.wait()
            started = time.thread_time()
            await sup._connect()
            await sup._read_task
            spent = time.thread_time() - started
            await sup._disconnect()
            sender.join()
            return spent
    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--batch", type=int, default=40,
                        help="records per batch line (~2 ms of records at 10k req/s)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    gcpolicy.tune()
    lines = capture(args.requests, args.connections, args.batch)
    sup, got = agent()
    feed(sup, capture(2000, args.connections, args.batch))  # warm up
    gcpolicy.settle()
    best = float("inf")
    profiler = cProfile.Profile() if args.profile else None
    for run in range(2 if args.profile else args.runs):
        before = got[0]
        profiling = profiler is not None and run == 1  # the ring full: the steady state
        collections = sum(s["collections"] for s in gc.get_stats())
        if profiling:
            profiler.enable()
        spent = feed(sup, lines)
        if profiling:
            profiler.disable()
        assert got[0] - before == 2 * args.requests, (got[0] - before, "flows missing")
        best = min(best, spent)
        print(f"# run: {spent / args.requests * 1e6:.2f} us/request, "
              f"{sum(s['collections'] for s in gc.get_stats()) - collections} collections",
              file=sys.stderr)
    print(f"{best / args.requests * 1e6:.2f} us agent CPU per request (2 flow records; "
          f"{len(lines)} batch lines of ~{args.batch} records, {args.connections} connections)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
