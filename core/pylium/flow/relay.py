"""`observe --all-nodes`: Hubble Relay's job, done by whichever agent is asked.

Every agent's flow component registers its API socket in the KV store under
`pylium/flow/peers/<node>` (on a lease, so a dead agent disappears). An `all_nodes` query
asks every registered agent's `/v1/flows` with the same filters and merges the answers:
by time when not following, as they arrive when following. An agent that cannot be asked is
reported in the stream as Hubble's `node_status` NODE_UNAVAILABLE line, never skipped
silently."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import aiohttp

from pylium.flow.model import rfc3339

log = logging.getLogger(__name__)

PEERS_PREFIX = "pylium/flow/peers/"
LEASE_TTL = 30.0


async def register(daemon) -> asyncio.Task | None:
    """Publish this agent as a flow peer and keep the lease alive; returns the keepalive task."""
    kv = daemon.kvstore
    if kv is None:
        return None
    lease = await kv.grant_lease(LEASE_TTL)
    key = PEERS_PREFIX + daemon.config.node_name
    value = json.dumps({"node_name": daemon.config.node_name,
                        "socket": str(daemon.config.socket)}).encode()
    await kv.put(key, value, lease=lease)

    async def keepalive() -> None:
        nonlocal lease
        while True:
            await asyncio.sleep(lease.ttl / 3)
            try:
                if not await kv.keepalive(lease):
                    lease = await kv.grant_lease(LEASE_TTL)
                    await kv.put(key, value, lease=lease)
            except Exception:
                log.warning("flow peer lease keepalive failed", exc_info=True)

    return daemon.spawn(keepalive())


async def peers(daemon) -> list[dict[str, str]]:
    if daemon.kvstore is None:
        return [{"node_name": daemon.config.node_name, "socket": str(daemon.config.socket)}]
    out = []
    for item in await daemon.kvstore.list(PEERS_PREFIX):
        try:
            out.append(json.loads(item.value))
        except ValueError:
            log.warning("bad flow peer record %s", item.key)
    return sorted(out, key=lambda p: p["node_name"])


def node_unavailable(name: str, message: str) -> dict[str, Any]:
    return {"node_status": {"state_change": "NODE_UNAVAILABLE", "node_names": [name],
                            "message": message},
            "time": rfc3339(time.time_ns())}


def _path(params: Mapping[str, Sequence[str]]) -> str:
    forwarded = {k: list(v) for k, v in params.items() if k != "all_nodes"}
    return "/v1/flows" + ("?" + urlencode(forwarded, doseq=True) if forwarded else "")


async def _lines(peer: dict[str, str], path: str, timeout: float | None) -> AsyncIterator[dict]:
    connector = aiohttp.UnixConnector(path=peer["socket"])
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        async with session.get(f"http://{peer['node_name']}{path}") as resp:
            if resp.status >= 400:
                text = await resp.text()
                try:
                    text = json.loads(text).get("error", text)
                except (ValueError, AttributeError):
                    pass
                raise RuntimeError(f"HTTP {resp.status}: {text}")
            async for raw in resp.content:
                line = raw.strip()
                if line:
                    yield json.loads(line)


async def query(daemon, params: Mapping[str, Sequence[str]]) -> list[dict]:
    """Every agent's answer to a non-follow query, merged by time."""
    path = _path(params)

    async def one(peer):
        try:
            return [line async for line in _lines(peer, path, 60.0)]
        except Exception as exc:
            return [node_unavailable(peer["node_name"], str(exc) or type(exc).__name__)]

    results = await asyncio.gather(*(one(p) for p in await peers(daemon)))
    merged = [line for lines in results for line in lines]
    merged.sort(key=lambda r: r.get("time", ""))  # RFC 3339, UTC, fixed width: sorts as text
    return merged


async def follow(daemon, params: Mapping[str, Sequence[str]]) -> AsyncIterator[dict]:
    """Every agent's stream, interleaved as lines arrive."""
    path = _path(params)
    queue: asyncio.Queue = asyncio.Queue(maxsize=10000)

    async def pump(peer):
        try:
            async for line in _lines(peer, path, None):
                await queue.put(line)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(node_unavailable(peer["node_name"], str(exc) or type(exc).__name__))

    tasks = [asyncio.create_task(pump(p)) for p in await peers(daemon)]
    try:
        while True:
            try:
                yield await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                yield {}  # heartbeat: lets the caller notice a gone client
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
