"""HTTP side of the flow component: Prometheus `/metrics`, the service-map page `/ui` and its
data `/ui/graph`, on `prometheus_serve_addr` (Cilium's agent uses :9962). The same page and
data are on the API socket as `/v1/ui` and `/v1/ui/graph` (routes_flow)."""

from __future__ import annotations

import logging
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pylium.errors import ConfigError
from pylium.flow.metrics import make_registry
from pylium.flow.servicemap import build_graph

log = logging.getLogger(__name__)

OBSERVER_KEY = web.AppKey("flow_observer", object)


def page_html() -> str:
    return resources.files("pylium.flow").joinpath("ui/servicemap.html").read_text()


def graph_for(observer) -> dict:
    endpoints = ()
    daemon = observer.daemon
    if daemon is not None and daemon.components.get("endpoint") is not None:
        endpoints = daemon.components["endpoint"].list()
    graph = build_graph(observer.ring.snapshot(), endpoints)
    graph["node_name"] = observer.node_name
    return graph


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"prometheus_serve_addr: {addr!r} is not HOST:PORT (e.g. 127.0.0.1:9962)")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_metrics_app(observer) -> web.Application:
    daemon = getattr(observer, "daemon", None)
    registry, collector = make_registry(observer, getattr(daemon, "metrics", None))
    app = web.Application()
    app[OBSERVER_KEY] = observer

    async def metrics(_request):
        daemon = observer.daemon
        if daemon is not None and daemon.kvstore is not None:
            try:
                collector.kvstore_status = await daemon.kvstore.status()
            except Exception as exc:
                collector.kvstore_status = {"healthy": False, "error": str(exc)}
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def ui(_request):
        return web.Response(text=page_html(), content_type="text/html")

    async def graph(_request):
        return web.json_response(graph_for(observer))

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/ui", ui)
    app.router.add_get("/ui/graph", graph)
    return app


async def start_metrics_server(observer, addr: str) -> web.AppRunner:
    host, port = parse_addr(addr)
    runner = web.AppRunner(make_metrics_app(observer), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"prometheus_serve_addr {addr}: {exc.strerror}") from None
    log.info("metrics and service map on http://%s:%d/metrics, /ui", host, port)
    return runner
