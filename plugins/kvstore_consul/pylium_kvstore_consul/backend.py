"""The `consul` backend: pylium's KV-store contract on Consul's KV store via `py-consul`.

TESTED ONLY AGAINST AN EMULATOR: no Consul agent runs on pylium's build machines, so this
backend has been exercised solely against the test suite's Consul HTTP API emulator
(`tests/support/consul_emulator.py`, not shipped), using the real `py-consul` client. Expect
surprises on a real Consul cluster.

Mapping (Consul has no revision history, so some etcd semantics degrade):
- revision  → Consul's KV index (`X-Consul-Index`); `mod_revision`/`create_revision` →
  `ModifyIndex`/`CreateIndex`. Every write is one `/v1/txn` so it is atomic and reports the
  index it was applied at; `put_many`/`delete_many` use one per 64 operations (Consul's
  maximum), like etcd's backend per 128.
- create / compare-and-swap → a transaction `check-not-exists` / `check-index` + write.
- lease → a Consul session with `Behavior=delete` and `LockDelay=0s`; keys are attached by
  acquiring them (`lock` verb) with the session; keepalive → session renew; revoke → destroy.
  Consul requires TTLs of at least 10 s (`min_session_ttl`) and invalidates a session only
  after up to twice its TTL. `Lease.id` is the session UUID as an integer. A plain `put` over
  a key held by a session keeps Consul's lock (unlike etcd, which detaches the lease).
- watch → blocking queries on the prefix; events are the differences between successive
  answers. So a watch delivers the *current* state of each changed key: changes made
  between two answers may be coalesced, and resuming after an old revision replays puts of
  keys modified since then but cannot replay deletions that happened while not watching
  (`watch_history = False` in the conformance suite). A watch survives Consul restarts by
  itself.

Options:
  `address`          `HOST:PORT` or `http://HOST:PORT` of the Consul agent (default
                     127.0.0.1:8500)
  `token`            ACL token (optional)
  `timeout`          seconds per request (default 5)
  `wait`             blocking-query wait in seconds (default 5)
  `min_session_ttl`  smallest session TTL to request (default 10, Consul's minimum)
  `retry_interval`   seconds between watch reconnection attempts (default 0.5)
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import consul
import consul.aio
from consul.callback import CB
from pylium.api import KVStore
from pylium.api.kvstore import (
    KVEvent,
    KVItem,
    KVStoreUnavailable,
    Lease,
    LeaseNotFound,
)
from pylium.errors import ConfigError, PyliumError

log = logging.getLogger(__name__)

OPTIONS = {"address", "token", "timeout", "wait", "min_session_ttl", "retry_interval"}
#: a key that never exists: reading it answers the KV index (the store's revision)
REVISION_PROBE = "pylium-revision-probe/never-written"
#: operations Consul accepts in one `/v1/txn` (its documented maximum)
TXN_OPS = 64


def parse_address(value: Any) -> tuple[str, int]:
    text = str(value or "127.0.0.1:8500").strip()
    url = urlsplit(text if "//" in text else "//" + text)
    if url.scheme not in ("", "http") or not url.hostname or url.path not in ("", "/"):
        raise ConfigError(f"kvstore option 'address': {text!r} is not HOST:PORT or "
                          "http://HOST:PORT (TLS is not supported yet)")
    try:
        return url.hostname, url.port or 8500
    except ValueError:
        raise ConfigError(f"kvstore option 'address': bad port in {text!r}") from None


def _positive(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"kvstore option {name!r} must be a positive number, got {value!r}")
    return float(value)


def lease_id(session: str | None) -> int:
    return uuid.UUID(session).int if session else 0


def session_id(lease: Lease) -> str:
    return str(uuid.UUID(int=lease.id))


def _item(entry: dict) -> KVItem:
    value = entry.get("Value")
    if isinstance(value, str):  # raw JSON from /v1/txn: base64
        value = base64.b64decode(value)
    return KVItem(key=entry["Key"], value=bytes(value or b""),
                  mod_revision=entry["ModifyIndex"], create_revision=entry["CreateIndex"],
                  lease=lease_id(entry.get("Session")))


class TxnFailed(Exception):
    def __init__(self, errors: list[dict]):
        super().__init__("; ".join(e.get("What", "?") for e in errors))
        self.errors = errors


class ConsulKVStore(KVStore):
    """Consul KV through py-consul (tested against pylium's Consul emulator only)."""

    name = "consul"

    def __init__(self, options: Mapping[str, Any], state_dir: Path):
        super().__init__(options, state_dir)
        unknown = set(self.options) - OPTIONS
        if unknown:
            raise ConfigError(f"unknown consul kvstore option(s): {', '.join(sorted(unknown))}")
        self.host, self.port = parse_address(self.options.get("address"))
        self.token = self.options.get("token")
        self.timeout = _positive(self.options, "timeout", 5.0)
        self.wait = _positive(self.options, "wait", 5.0)
        self.min_session_ttl = _positive(self.options, "min_session_ttl", 10.0)
        self.retry_interval = _positive(self.options, "retry_interval", 0.5)
        self._consul: consul.aio.Consul | None = None
        self._closed = True

    @property
    def where(self) -> str:
        return f"http://{self.host}:{self.port}"

    # plumbing ----------------------------------------------------------------------------
    @property
    def client(self) -> consul.aio.Consul:
        if self._closed or self._consul is None:
            raise KVStoreUnavailable(f"consul kvstore ({self.where}) is not open")
        return self._consul

    def _unavailable(self, exc: BaseException) -> KVStoreUnavailable:
        detail = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        return KVStoreUnavailable(f"consul at {self.where} unavailable: {detail}")

    async def _call(self, coro, timeout: float | None = None):
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(timeout or self.timeout):
                return await coro
        except (aiohttp.ClientError, TimeoutError, consul.ConsulException) as exc:
            raise self._unavailable(exc) from None

    async def _txn(self, ops: list[dict]) -> list[dict]:
        """Run a transaction; its results, or TxnFailed with Consul's errors."""
        def answer(response):
            return response.code, response.body
        code, body = await self._call(self.client.http.put(
            answer, "/v1/txn", data=json.dumps(ops), headers=self.client.prepare_headers()))
        if code == 409:
            raise TxnFailed(json.loads(body).get("Errors") or [])
        if code != 200:
            raise self._unavailable(RuntimeError(f"HTTP {code} {body.strip()}"))
        return json.loads(body).get("Results") or []

    @staticmethod
    def _write_op(key: str, value: bytes, lease: Lease | None) -> dict:
        op = {"Verb": "set", "Key": key, "Value": base64.b64encode(bytes(value)).decode()}
        if lease is not None:
            op.update(Verb="lock", Session=session_id(lease))
        return {"KV": op}

    def _write_failed(self, exc: TxnFailed, lease: Lease | None) -> PyliumError:
        if lease is not None and "session" in str(exc) and "invalid" in str(exc):
            return LeaseNotFound(f"consul session {session_id(lease)} expired or was destroyed")
        return PyliumError(f"consul refused the write: {exc}")

    # lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        if not self._closed:
            return
        self._consul = consul.aio.Consul(host=self.host, port=self.port, token=self.token,
                                         scheme="http", verify=False)
        self._closed = False
        try:
            leader = await self._call(self._consul.status.leader())
        except KVStoreUnavailable as exc:
            await self.close()
            raise KVStoreUnavailable(f"cannot reach consul at {self.where}: "
                                     f"{str(exc).split(': ', 1)[-1]}") from None
        if not leader:
            await self.close()
            raise KVStoreUnavailable(f"consul at {self.where} has no leader")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._consul = self._consul, None
        if client is not None:
            await client.close()

    # reads -------------------------------------------------------------------------------
    async def get(self, key: str) -> KVItem | None:
        _, entry = await self._call(self.client.kv.get(key))
        return _item(entry) if entry else None

    async def _list(self, prefix: str, index: int | None = None) -> tuple[int, list[KVItem]]:
        timeout = self.timeout + (self.wait * 17 / 16 if index else 0)
        kwargs = {"index": index, "wait": f"{self.wait:g}s"} if index else {}
        idx, entries = await self._call(self.client.kv.get(prefix, recurse=True, **kwargs),
                                        timeout=timeout)
        items = sorted((_item(e) for e in entries or []), key=lambda i: i.key.encode())
        return int(idx), items

    async def list(self, prefix: str) -> list[KVItem]:
        return (await self._list(prefix))[1]

    async def revision(self) -> int:
        idx, _ = await self._call(self.client.kv.get(REVISION_PROBE))
        return int(idx)

    # writes ------------------------------------------------------------------------------
    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        try:
            results = await self._txn([self._write_op(key, value, lease)])
        except TxnFailed as exc:
            raise self._write_failed(exc, lease) from None
        return results[0]["KV"]["ModifyIndex"]

    async def put_many(self, items: list[tuple[str, bytes]], lease: Lease | None = None) -> int:
        """Puts in transactions of at most `TXN_OPS`: one index, so one answer to a
        blocking watch, per transaction instead of per key."""
        index = 0
        for at in range(0, len(items), TXN_OPS):
            ops = [self._write_op(key, value, lease) for key, value in items[at:at + TXN_OPS]]
            try:
                results = await self._txn(ops)
            except TxnFailed as exc:
                raise self._write_failed(exc, lease) from None
            index = results[-1]["KV"]["ModifyIndex"]
        return index

    async def delete_many(self, keys: list[str]) -> int:
        """Deletes in transactions of `TXN_OPS` operations: per key a `get-tree` (which,
        unlike `get`, does not fail the transaction when the key is missing; its answer is
        counted only for keys asked for) and a `delete`, so what existed is counted in the
        same transaction that deletes it."""
        keys = list(dict.fromkeys(keys))
        deleted = 0
        per_txn = TXN_OPS // 2
        for at in range(0, len(keys), per_txn):
            chunk = keys[at:at + per_txn]
            ops = [op for key in chunk for op in ({"KV": {"Verb": "get-tree", "Key": key}},
                                                  {"KV": {"Verb": "delete", "Key": key}})]
            results = await self._txn(ops)
            # distinct keys: `get-tree a/1` also finds a later `a/10`, seen again by its own
            found = {(r.get("KV") or {}).get("Key") for r in results}
            deleted += len(found.intersection(chunk))
        return deleted

    async def delete(self, key: str) -> bool:
        try:
            await self._txn([{"KV": {"Verb": "get", "Key": key}},
                             {"KV": {"Verb": "delete", "Key": key}}])
        except TxnFailed:
            return False  # the `get` failed: no such key
        return True

    async def delete_prefix(self, prefix: str) -> int:
        results = await self._txn([{"KV": {"Verb": "get-tree", "Key": prefix}},
                                   {"KV": {"Verb": "delete-tree", "Key": prefix}}])
        return len(results)

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        return await self.compare_and_swap(key, 0, value, lease)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: Lease | None = None
    ) -> bool:
        check = {"Verb": "check-not-exists", "Key": key} if expected_mod_revision == 0 else \
            {"Verb": "check-index", "Key": key, "Index": expected_mod_revision}
        try:
            await self._txn([{"KV": check}, self._write_op(key, value, lease)])
        except TxnFailed as exc:
            if any(e.get("OpIndex") == 0 for e in exc.errors):
                return False
            raise self._write_failed(exc, lease) from None
        return True

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        if expected_mod_revision <= 0:
            return False
        try:
            await self._txn([{"KV": {"Verb": "delete-cas", "Key": key,
                                     "Index": expected_mod_revision}}])
        except TxnFailed:
            return False
        return True

    # watches -----------------------------------------------------------------------------
    async def watch(self, prefix: str, after_revision: int = 0) -> AsyncIterator[KVEvent]:
        index, items = await self._list(prefix)
        known = {i.key: i for i in items}
        if after_revision:
            for item in sorted(items, key=lambda i: (i.mod_revision, i.key.encode())):
                if item.mod_revision > after_revision:
                    yield KVEvent("put", item.key, item.value, item.mod_revision)
        failures = 0
        while True:
            try:
                new_index, items = await self._list(prefix, index=index)
            except KVStoreUnavailable as exc:
                if self._closed:
                    raise KVStoreUnavailable(f"consul kvstore ({self.where}) was closed") \
                        from None
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "consul watch of %r: %s; retrying", prefix, exc)
                await asyncio.sleep(self.retry_interval)
                continue
            if failures:
                log.info("consul watch of %r resumed after %d failed attempts", prefix,
                         failures)
                failures = 0
            if new_index < index:
                new_index = 0  # Consul reset its index (e.g. restored snapshot): start over
            current = {i.key: i for i in items}
            events = [KVEvent("put", i.key, i.value, i.mod_revision) for i in items
                      if i.key not in known or known[i.key].mod_revision != i.mod_revision]
            events += [KVEvent("delete", key, b"", max(new_index, index))
                       for key in known if key not in current]
            for event in sorted(events, key=lambda e: (e.revision, e.key.encode())):
                yield event
            known, index = current, max(new_index, 1)

    # leases ------------------------------------------------------------------------------
    async def grant_lease(self, ttl: float) -> Lease:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        granted = float(max(math.ceil(ttl), math.ceil(self.min_session_ttl)))
        body = json.dumps({"Name": "pylium", "TTL": f"{granted:g}s", "Behavior": "delete",
                           "LockDelay": "0s"})
        # py-consul's session.create refuses TTLs under 10 s; the HTTP call is the same
        session = await self._call(self.client.http.put(
            CB.json(is_id=True), "/v1/session/create", data=body,
            headers=self.client.prepare_headers()))
        return Lease(id=lease_id(session), ttl=granted)

    async def keepalive(self, lease: Lease) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.session.renew(session_id(lease))
        except consul.NotFound:
            return False
        except (aiohttp.ClientError, TimeoutError, consul.ConsulException) as exc:
            raise self._unavailable(exc) from None
        return True

    async def revoke_lease(self, lease: Lease) -> None:
        await self._call(self.client.session.destroy(session_id(lease)))

    # health ------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        try:
            leader = await self._call(self.client.status.leader())
            revision = await self.revision()
        except KVStoreUnavailable as exc:
            return {"backend": self.name, "healthy": False, "revision": 0, "detail": str(exc)}
        return {"backend": self.name, "healthy": bool(leader), "revision": revision,
                "detail": f"consul at {self.where}, leader {leader or 'none'}",
                "leader": leader}


#: the name the plugin skeleton registered first
KvstoreConsul = ConsulKVStore
