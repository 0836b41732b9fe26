"""Read-only view of the agent's KV store: get a key, list a prefix, stream a prefix's changes.

    GET /v1/kvstore/status
    GET /v1/kvstore/get?key=K                      → item, 404 if absent
    GET /v1/kvstore/list?prefix=P                  → {"revision", "items"}
    GET /v1/kvstore/watch?prefix=P[&after_revision=N][&count=N]
        → newline-delimited JSON events over a chunked response (until the client leaves,
          or after `count` events)

Values are shown decoded: JSON when the bytes are UTF-8 JSON, else the UTF-8 text, else
base64 (`encoding` says which)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.agent.server import NotFound
from pylium.api.kvstore import KVEvent, KVItem, KVStore, KVStoreUnavailable
from pylium.documents import DocumentError, load_json
from pylium.errors import UserError


def decode_value(raw: bytes) -> tuple[Any, str]:
    """(value, encoding) for display: "json", "utf-8" or "base64"."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode(), "base64"
    try:
        return load_json(text, "value"), "json"
    except DocumentError:  # not JSON, or JSON nested too deep to show as such: the text
        return text, "utf-8"


def item_to_dict(item: KVItem) -> dict[str, Any]:
    value, encoding = decode_value(item.value)
    return {"key": item.key, "value": value, "encoding": encoding,
            "mod_revision": item.mod_revision, "create_revision": item.create_revision,
            "lease": item.lease}


def event_to_dict(event: KVEvent) -> dict[str, Any]:
    value, encoding = decode_value(event.value)
    return {"type": event.type, "key": event.key, "value": value if event.value else None,
            "encoding": encoding, "revision": event.revision}


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"query parameter {name!r} must be an integer, got {raw!r}") from None
    if value < 0:
        raise UserError(f"query parameter {name!r} must not be negative")
    return value


def setup(app: web.Application, daemon: Daemon) -> None:
    def store() -> KVStore:
        if daemon.kvstore is None:
            raise KVStoreUnavailable("the agent's KV store is not open")
        return daemon.kvstore

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(await store().status())

    async def get(request: web.Request) -> web.Response:
        key = request.query.get("key")
        if not key:
            raise UserError("query parameter 'key' is required")
        item = await store().get(key)
        if item is None:
            raise NotFound(f"key {key!r} not found")
        return web.json_response(item_to_dict(item))

    async def list_prefix(request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        kv = store()
        revision = await kv.revision()
        items = await kv.list(prefix)
        return web.json_response({"revision": revision,
                                  "items": [item_to_dict(i) for i in items]})

    async def watch(request: web.Request) -> web.StreamResponse:
        prefix = request.query.get("prefix", "")
        after = _int_param(request, "after_revision", 0)
        count = _int_param(request, "count", 0)
        events = store().watch(prefix, after_revision=after)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        def client_gone() -> bool:
            return request.transport is None or request.transport.is_closing()

        sent = 0
        next_event: asyncio.Future | None = None
        try:
            while not count or sent < count:
                next_event = asyncio.ensure_future(anext(events))
                # aiohttp does not cancel a handler whose client left: look every second
                while not (await asyncio.wait({next_event}, timeout=1.0))[0]:
                    if client_gone():
                        next_event.cancel()
                        await asyncio.gather(next_event, return_exceptions=True)
                        return response
                event = next_event.result()
                await response.write(json.dumps(event_to_dict(event)).encode() + b"\n")
                sent += 1
        except StopAsyncIteration:
            pass
        except ConnectionResetError:
            return response
        except KVStoreUnavailable as exc:
            await response.write(json.dumps({"error": str(exc)}).encode() + b"\n")
        finally:
            if next_event is not None and not next_event.done():
                # cancelled (the server stops) while waiting: the generator is still
                # running inside that future and cannot be closed before it ends
                next_event.cancel()
                await asyncio.gather(next_event, return_exceptions=True)
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()
        await response.write_eof()
        return response

    app.router.add_get("/v1/kvstore/status", status)
    app.router.add_get("/v1/kvstore/get", get)
    app.router.add_get("/v1/kvstore/list", list_prefix)
    app.router.add_get("/v1/kvstore/watch", watch)
