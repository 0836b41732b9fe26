"""Flows: `GET /v1/flows` (filters as query parameters, NDJSON `{"flow": ...}` /
`{"lost_events": ...}` lines like `hubble observe -o json`; `follow=true` streams chunked;
`all_nodes=true` merges every agent's answer, see `pylium.flow.relay`),
`GET /v1/flows/status`, and the service map `GET /v1/ui` + `GET /v1/ui/graph`."""

from __future__ import annotations

import json

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.errors import PyliumError

NDJSON = "application/x-ndjson"


def _observer(daemon: Daemon):
    observer = daemon.components.get("flow")
    if observer is None:
        raise PyliumError("flow observer is not running in this agent")
    return observer


def _params(request: web.Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in request.query.items():
        out.setdefault(key, []).append(value)
    return out


def _lines(records) -> bytes:
    from pylium.flow.model import to_response

    return b"".join(json.dumps(to_response(r), separators=(",", ":")).encode() + b"\n"
                    for r in records)


def setup(app: web.Application, daemon: Daemon) -> None:
    from pylium.flow.filters import parse_query

    async def flows(request: web.Request) -> web.StreamResponse:
        params = _params(request)
        all_nodes = params.pop("all_nodes", ["false"])[-1].lower() in ("1", "true", "yes")
        query = parse_query(params)  # refuse bad filters here, before asking anyone else
        if all_nodes:
            return await relay_flows(request, params, query.follow)
        observer = _observer(daemon)
        ring = observer.ring
        if not query.follow:
            records = query.select(ring.snapshot())
            return web.Response(body=_lines(records), content_type=NDJSON)
        history, _missed, start = ring.read(ring.oldest)
        backlog = query.select(history) if (query.last is not None or query.since_ns
                                            is not None or query.first is not None) else []
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            if backlog:
                await response.write(_lines(backlog))
            async for batch in ring.follow(start):
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                matched = [r for r in batch if query.matches(r)]
                if matched:
                    await response.write(_lines(matched))
        except ConnectionResetError:
            pass
        return response

    async def relay_flows(request: web.Request, params, follow: bool) -> web.StreamResponse:
        from pylium.flow import relay

        if not follow:
            lines = await relay.query(daemon, params)
            body = b"".join(json.dumps(x, separators=(",", ":")).encode() + b"\n" for x in lines)
            return web.Response(body=body, content_type=NDJSON)
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        stream = relay.follow(daemon, params)
        try:
            async for line in stream:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if line:
                    await response.write(json.dumps(line, separators=(",", ":")).encode()
                                         + b"\n")
        except ConnectionResetError:
            pass
        finally:
            await stream.aclose()
        return response

    async def status(_request):
        return web.json_response(_observer(daemon).stats())

    async def ui(_request):
        from pylium.flow.http import page_html

        return web.Response(text=page_html(), content_type="text/html")

    async def graph(_request):
        from pylium.flow.http import graph_for

        return web.json_response(graph_for(_observer(daemon)))

    app.router.add_get("/v1/flows", flows)
    app.router.add_get("/v1/flows/status", status)
    app.router.add_get("/v1/ui", ui)
    app.router.add_get("/v1/ui/graph", graph)
