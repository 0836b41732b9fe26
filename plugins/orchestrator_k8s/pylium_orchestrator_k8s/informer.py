"""List-then-watch of one resource kind, the way client-go's reflector does it.

The first list gives the objects and a resourceVersion; watches resume from the last
resourceVersion seen (events and bookmarks), so an API server restart or a dropped connection
loses nothing. When the server answers 410 Gone (the version was compacted away) the informer
lists again and diffs the result against its cache: objects that vanished meanwhile are
reported DELETED, changed ones MODIFIED. Objects are plain dicts (the API's JSON), so core
kinds and custom resources take the same path."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

#: a call of a kubernetes_asyncio list function with `_preload_content=False` and the
#: given query parameters; returns the raw aiohttp response
Lister = Callable[..., Awaitable[Any]]
Handler = Callable[[str, dict[str, Any]], Awaitable[None]]
Key = tuple[str, str]

WATCH_TIMEOUT_S = 240
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0


class Gone(Exception):
    """The watched resourceVersion is too old (HTTP 410): list again."""


class ApiError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text[:200]}")
        self.status = status


def object_key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _rv(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class Informer:
    """One kind: `cache` holds every object by (namespace, name); `handler(type, obj)` hears
    ADDED / MODIFIED / DELETED in order. `synced` is set after the first complete list."""

    def __init__(self, kind: str, api_version: str, lister: Lister, handler: Handler, *,
                 watch_timeout: int = WATCH_TIMEOUT_S, optional: bool = False):
        self.kind = kind
        self.api_version = api_version
        self.lister = lister
        self.handler = handler
        self.watch_timeout = watch_timeout
        #: a custom resource whose CRD may not be installed: a 404 means "none exist" (the
        #: informer counts as synced, empty) and it keeps asking until the CRD appears
        self.optional = optional
        self.cache: dict[Key, dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.stats = {"lists": 0, "relists_gone": 0, "watches": 0, "resumes": 0,
                      "events": 0, "errors": 0}
        self.last_error = ""
        self.last_event_at = 0.0

    def status(self) -> dict[str, Any]:
        return {"kind": self.kind, "synced": self.synced.is_set(), "objects": len(self.cache),
                "resource_version": self.resource_version, **self.stats,
                "last_error": self.last_error}

    async def run(self) -> None:
        """Forever: list when needed, then watch from the last version; errors back off."""
        failures = 0
        while True:
            try:
                if not self.resource_version:
                    await self._relist()
                await self._watch()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("%s: resourceVersion %s is gone; listing again", self.kind,
                         self.resource_version)
                self.stats["relists_gone"] += 1
                self.resource_version = ""
            except Exception as exc:  # connection refused, reset, API errors: retry
                failures += 1
                self.stats["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                level = logging.INFO if failures == 1 else logging.DEBUG
                log.log(level, "%s watch failed (%s); retrying", self.kind, self.last_error)
                await asyncio.sleep(min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures, 6)))

    async def _relist(self) -> None:
        resp = await self.lister(_preload_content=False, _request_timeout=(5, 60))
        try:
            body = await resp.read()
            if resp.status != 200:
                if resp.status == 404 and self.optional:
                    for key in list(self.cache):
                        await self._deliver("DELETED", self.cache.pop(key))
                    self.synced.set()
                raise ApiError(resp.status, body.decode(errors="replace"))
        finally:
            resp.release()
        data = json.loads(body)
        self.stats["lists"] += 1
        seen: set[Key] = set()
        for obj in data.get("items") or []:
            obj.setdefault("kind", self.kind)
            obj.setdefault("apiVersion", self.api_version)
            key = object_key(obj)
            seen.add(key)
            old = self.cache.get(key)
            if old is not None and _rv(old) == _rv(obj):
                continue
            self.cache[key] = obj
            await self._deliver("ADDED" if old is None else "MODIFIED", obj)
        for key in [k for k in self.cache if k not in seen]:
            await self._deliver("DELETED", self.cache.pop(key))
        self.resource_version = str((data.get("metadata") or {}).get("resourceVersion") or "")
        self.synced.set()

    async def _watch(self) -> None:
        self.stats["watches"] += 1
        if self.stats["watches"] > 1:
            self.stats["resumes"] += 1
        resp = await self.lister(watch=True, resource_version=self.resource_version,
                                 allow_watch_bookmarks=True,
                                 timeout_seconds=self.watch_timeout,
                                 _preload_content=False,
                                 _request_timeout=(5, self.watch_timeout + 30))
        try:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise ApiError(resp.status, (await resp.read()).decode(errors="replace"))
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        await self._event(json.loads(line))
        finally:
            resp.release()

    async def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ApiError(int(obj.get("code") or 0), str(obj.get("message") or obj))
        rv = _rv(obj)
        if kind == "BOOKMARK":
            self.resource_version = rv or self.resource_version
            return
        obj.setdefault("kind", self.kind)
        obj.setdefault("apiVersion", self.api_version)
        key = object_key(obj)
        if kind == "DELETED":
            self.cache.pop(key, None)
        else:
            self.cache[key] = obj
        self.resource_version = rv or self.resource_version
        await self._deliver(kind, obj)

    async def _deliver(self, kind: str, obj: dict[str, Any]) -> None:
        self.stats["events"] += 1
        self.last_event_at = time.time()
        try:
            await self.handler(kind, obj)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad object must not stop the watch
            log.exception("%s %s %s/%s: handler failed", self.kind, kind, *object_key(obj))
