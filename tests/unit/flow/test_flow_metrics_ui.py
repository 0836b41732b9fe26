"""Prometheus metrics (promtool-clean, scraped by a real Prometheus) and the service-map
page rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
import types
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pylium.flow.component import FlowObserver
from pylium.flow.http import start_metrics_server

from .flow_starwars import starwars_events, starwars_resolver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeEndpoints:
    """Stands in for the endpoint component's `list()` (its records' fields only)."""

    def list(self):
        return [types.SimpleNamespace(id=11, name="deathstar", namespace="default",
                                      identity=1001, state="ready")]


class FakeKV:
    async def status(self):
        return {"healthy": True}


class MetricsServer:
    def __init__(self, observer):
        self.observer = observer
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.runner = self.loop.run_until_complete(
            start_metrics_server(self.observer, f"127.0.0.1:{self.port}"))
        self.ready.set()
        self.loop.run_forever()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            return r.read()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server():
    observer = FlowObserver("node-a", starwars_resolver, capacity=1000)
    observer.daemon = types.SimpleNamespace(components={"endpoint": FakeEndpoints()},
                                            kvstore=FakeKV(), started_at=time.time())
    observer.ingest(b"".join(starwars_events() * 5))
    observer.ring.append_lost("PERF_EVENT_RING_BUFFER", 3)
    with MetricsServer(observer) as s:
        yield s


def parse_exposition(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_values_and_promtool(server):
    body = server.get("/metrics")
    samples = parse_exposition(body.decode())
    assert samples['pylium_drop_count_total{direction="INGRESS",reason="Policy denied"}'] == 5
    assert samples['pylium_forward_count_total{direction="INGRESS"}'] == 5
    assert samples['pylium_policy_verdict_total{action="deny",direction="INGRESS",match="none"}'] == 5
    assert samples['pylium_policy_verdict_total{action="allow",direction="INGRESS",match="l3-l4"}'] == 5
    assert samples['pylium_flows_processed_total{subtype="drop",type="L3_L4",verdict="DROPPED"}'] == 5
    assert samples['pylium_endpoint'] == 1
    assert samples['pylium_endpoint_state{endpoint_state="ready"}'] == 1
    assert samples['pylium_kvstore_healthy'] == 1
    assert samples['pylium_flow_ring_flows'] == 21  # 20 flows + 1 lost record
    assert samples['pylium_events_lost_total{source="agent_decoder"}'] == 0
    check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_real_prometheus_scrapes_the_agent(server, tmp_path):
    assert shutil.which("prometheus"), "Debian package prometheus is required (Makefile)"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: pylium\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.port}']}}]\n")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        query = urllib.parse.quote('pylium_drop_count_total{reason="Policy denied"}')
        deadline = time.monotonic() + 60
        result = []
        while time.monotonic() < deadline and not result:
            time.sleep(1)
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5) as r:
                    result = json.load(r)["data"]["result"]
            except OSError:
                continue
        assert result, "Prometheus never got the series"
        assert result[0]["metric"]["job"] == "pylium"
        assert float(result[0]["value"][1]) == 5
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


CHROMIUM = "/usr/bin/chromium"


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    profile.mkdir()
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         *args], capture_output=True, timeout=120)


def test_service_map_page_in_headless_chromium(server, tmp_path):
    assert Path(CHROMIUM).exists(), "Debian package chromium is required (Makefile)"
    graph = json.loads(server.get("/ui/graph"))
    assert {e["verdict"] for e in graph["edges"]} == {"FORWARDED", "DROPPED"}
    dom = chromium(["--dump-dom", server.url("/ui?interval=500")], tmp_path)
    html = dom.stdout.decode()
    assert 'data-rendered="' in html, dom.stderr.decode()[-2000:]
    edges = {}
    for frag in html.split('<g class="edge ')[1:]:
        state = frag.split('"', 1)[0]
        attrs = dict(part.split('="', 1) for part in frag.split(">", 1)[0].split('" ')
                     if '="' in part)
        edges[(attrs["data-from"], attrs["data-to"].rstrip('"'))] = (state, attrs)
    assert edges[("default/tiefighter", "default/deathstar")][0] == "forwarded"
    assert edges[("default/xwing", "default/deathstar")][0] == "dropped"
    assert 'data-verdict="DROPPED"' in html
    shot = tmp_path / "servicemap.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,760",
              server.url("/ui?interval=500")], tmp_path)
    assert shot.exists() and shot.stat().st_size > 5000
    keep = Path("/tmp/pylium-servicemap.png")
    shutil.copy(shot, keep)  # for a human to look at after the run


def test_service_map_edge_is_dropped_when_the_receiver_drops_what_the_sender_allowed():
    from pylium.flow.decode import Decoder, encode_event
    from pylium.flow.servicemap import build_graph

    xw = dict(ep_id=13, src_identity=1003, dst_identity=1001, saddr="10.200.0.12",
              daddr="10.200.0.10", sport=43210, dport=80, protocol=6, tcp_flags=2)
    raw = b"".join([
        encode_event(type=3, reason=1, direction=1, **xw),           # xwing egress: allowed
        encode_event(type=2, reason=5, direction=1, **xw),           # from-endpoint
        *starwars_events(),                                          # deathstar ingress
    ])
    graph = build_graph(Decoder("n", starwars_resolver).decode(raw))
    edges = {(e["from"], e["to"]): e for e in graph["edges"]}
    xwing = edges[("default/xwing", "default/deathstar")]
    assert (xwing["verdict"], xwing["forwarded"], xwing["dropped"]) == ("DROPPED", 0, 1)
    assert edges[("default/tiefighter", "default/deathstar")]["verdict"] == "FORWARDED"
