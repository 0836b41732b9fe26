"""The `etcd` backend: pylium's KV-store contract on etcd v3 through `aetcd` (asyncio gRPC).

The contract's semantics are etcd's own, so this is a thin mapping: revisions are etcd
revisions, create/CAS are single etcd transactions comparing `create_revision`/`mod_revision`,
leases are etcd leases, and watches are etcd watches. A watch whose stream breaks (etcd
restarted, network blip) reconnects by itself and resumes exactly after the last event it
delivered, so a consumer sees every change once; only a compacted history ends it with
`KVStoreCompacted`.

Options:
  `endpoints`        list of `http://HOST:PORT` client URLs (or one comma-separated string);
                     default `["http://127.0.0.1:2379"]`. Several IP endpoints form one gRPC
                     channel that fails over between them.
  `timeout`          seconds per request (default 5)
  `connect_timeout`  seconds `open()` waits for the first answer (default 5)
  `retry_interval`   seconds between watch reconnection attempts (default 0.5)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aetcd
import aetcd.exceptions as etcd_errors
import grpc
from aetcd import rpc
from pylium.api import KVStore
from pylium.api.kvstore import (
    KVEvent,
    KVItem,
    KVStoreCompacted,
    KVStoreReset,
    KVStoreTimeout,
    KVStoreUnavailable,
    Lease,
    LeaseNotFound,
)
from pylium.errors import ConfigError
from pylium.kvstore.embedded import prefix_range

log = logging.getLogger(__name__)

OPTIONS = {"endpoints", "timeout", "connect_timeout", "retry_interval"}
#: mvccpb.Event.EventType PUT (the other is DELETE)
PUT = rpc.Event.PUT
#: etcd's default limit of operations in one transaction (--max-txn-ops)
TXN_OPS = 128
#: how etcd says it could not complete a request in time (its apply fell behind, a slow
#: disk): "etcdserver: request timed out[, waiting for the applied index took too long]"
SERVER_TIMEOUT = "etcdserver: request timed out"


def parse_endpoints(value: Any) -> list[tuple[str, int]]:
    """`endpoints` option → [(host, port)]; ConfigError naming the bad entry otherwise."""
    if value is None:
        value = ["http://127.0.0.1:2379"]
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError("kvstore option 'endpoints' must be a non-empty list of URLs")
    endpoints = []
    for entry in value:
        url = urlsplit(str(entry).strip())
        if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
            raise ConfigError(f"kvstore option 'endpoints': {entry!r} is not an "
                              "http://HOST:PORT URL (TLS is not supported yet)")
        try:
            port = url.port or 2379
        except ValueError:
            raise ConfigError(f"kvstore option 'endpoints': bad port in {entry!r}") from None
        endpoints.append((url.hostname, port))
    return endpoints


def _positive(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"kvstore option {name!r} must be a positive number, got {value!r}")
    return float(value)


def _grpc_target(endpoints: list[tuple[str, int]]) -> tuple[str, int]:
    """aetcd dials f"{host}:{port}". Several IP endpoints become one gRPC `ipv4:`/`ipv6:`
    multi-address target (pick-first with failover); a DNS name uses the first endpoint."""
    if len(endpoints) == 1:
        return endpoints[0]
    try:
        families = {ipaddress.ip_address(h).version for h, _ in endpoints}
    except ValueError:
        return endpoints[0]
    if families == {4}:
        addresses = ",".join(f"{h}:{p}" for h, p in endpoints[:-1])
        return f"ipv4:{addresses},{endpoints[-1][0]}", endpoints[-1][1]
    if families == {6}:
        addresses = ",".join(f"[{h}]:{p}" for h, p in endpoints[:-1])
        return f"ipv6:{addresses},[{endpoints[-1][0]}]", endpoints[-1][1]
    return endpoints[0]


def _item(kv) -> KVItem:
    return KVItem(key=kv.key.decode(), value=bytes(kv.value), mod_revision=kv.mod_revision,
                  create_revision=kv.create_revision, lease=kv.lease)


class _Misrouted(Exception):
    """A watch delivered an event for a key outside its range."""


class _WatchStream:
    """One watch on its own gRPC stream, read directly (no aetcd `Watcher`: it wraps every
    event in its own objects and awaits a callback per event). Iterating yields each
    response's events as one (non-empty) sequence."""

    def __init__(self, call):
        self.call = call
        self._first = ()

    @classmethod
    async def open(cls, client: aetcd.Client, key: bytes, range_end: bytes,
                   start_revision: int, timeout: float) -> _WatchStream:
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        stream = cls(call)
        try:
            async with asyncio.timeout(timeout):
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=key, range_end=range_end, start_revision=start_revision)))
                response = await stream._read()
            if not response.created:
                raise etcd_errors.ClientError("etcd did not confirm the watch")
            stream._first = response.events
        except BaseException:
            call.cancel()
            raise
        return stream

    async def _read(self):
        response = await self.call.read()
        if response is grpc.aio.EOF:
            raise etcd_errors.ClientError("watch stream ended")
        if response.compact_revision:
            raise etcd_errors.RevisionCompactedError(response.compact_revision)
        if response.canceled:
            raise etcd_errors.ClientError(f"watch canceled: {response.cancel_reason or '?'}")
        return response

    def __aiter__(self):
        return self

    async def __anext__(self):
        events, self._first = self._first, ()
        while not events:
            events = (await self._read()).events
        return events

    async def close(self) -> None:
        self.call.cancel()


class EtcdKVStore(KVStore):
    """etcd v3 through aetcd."""

    name = "etcd"

    def __init__(self, options: Mapping[str, Any], state_dir: Path):
        super().__init__(options, state_dir)
        unknown = set(self.options) - OPTIONS
        if unknown:
            raise ConfigError(f"unknown etcd kvstore option(s): {', '.join(sorted(unknown))}")
        self.endpoints = parse_endpoints(self.options.get("endpoints"))
        self.timeout = _positive(self.options, "timeout", 5.0)
        self.connect_timeout = _positive(self.options, "connect_timeout", 5.0)
        self.retry_interval = _positive(self.options, "retry_interval", 0.5)
        self._client: aetcd.Client | None = None
        self._closed = True

    @property
    def where(self) -> str:
        return ", ".join(f"http://{h}:{p}" for h, p in self.endpoints)

    # plumbing ----------------------------------------------------------------------------
    def _unavailable(self, exc: BaseException,
                     kind: type[KVStoreUnavailable] = KVStoreUnavailable) -> KVStoreUnavailable:
        detail = str(exc).strip() or type(exc).__name__
        return kind(f"etcd at {self.where} unavailable: {detail.splitlines()[0]}")

    @property
    def client(self) -> aetcd.Client:
        if self._closed or self._client is None:
            raise KVStoreUnavailable(f"etcd kvstore ({self.where}) is not open")
        return self._client

    async def _call(self, coro):
        try:
            return await coro
        except etcd_errors.ClientError as exc:
            if "lease not found" in str(exc):
                raise LeaseNotFound(f"etcd: {exc}") from None
            if isinstance(exc, etcd_errors.ConnectionTimeoutError) or \
                    SERVER_TIMEOUT in str(exc):
                raise self._unavailable(exc, KVStoreTimeout) from None
            raise self._unavailable(exc) from None
        except rpc.AioRpcError as exc:  # raw stub calls are not wrapped by aetcd
            if exc.code() == rpc.StatusCode.NOT_FOUND and "lease not found" in exc.details():
                raise LeaseNotFound(f"etcd: {exc.details()}") from None
            slow = exc.code() == rpc.StatusCode.DEADLINE_EXCEEDED or \
                SERVER_TIMEOUT in (exc.details() or "")
            raise self._unavailable(RuntimeError(exc.details() or exc.code().name),
                                    KVStoreTimeout if slow else KVStoreUnavailable) from None
        except TimeoutError as exc:
            raise self._unavailable(exc) from None

    async def _range(self, key: bytes, range_end: bytes | None = None, **fields):
        request = rpc.RangeRequest(key=key, **fields)
        if range_end is not None:
            request.range_end = range_end
        client = self.client
        return await self._call(client.kvstub.Range(request, timeout=self.timeout,
                                                    metadata=client.metadata))

    # lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        if not self._closed:
            return
        host, port = _grpc_target(self.endpoints)
        # gRPC's default reconnect backoff grows to 120 s: after a long outage the agent
        # would stay degraded well after etcd is back. Retry at most every 2 s instead.
        self._client = aetcd.Client(host=host, port=port, timeout=self.timeout, options={
            "grpc.initial_reconnect_backoff_ms": 200, "grpc.min_reconnect_backoff_ms": 200,
            "grpc.max_reconnect_backoff_ms": 2000})
        self._closed = False
        try:
            await self._call(self._client.connect())
            async with asyncio.timeout(self.connect_timeout):
                await self._range(b"\0", count_only=True)
        except (KVStoreUnavailable, TimeoutError) as exc:
            await self.close()
            reason = str(exc).split(": ", 1)[-1] if isinstance(exc, KVStoreUnavailable) \
                else f"no answer in {self.connect_timeout:g}s"
            raise KVStoreUnavailable(f"cannot reach etcd at {self.where}: {reason}") from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a broken channel must not hide the real problem
                log.debug("closing etcd client failed", exc_info=True)

    # reads -------------------------------------------------------------------------------
    async def get(self, key: str) -> KVItem | None:
        response = await self._range(key.encode())
        return _item(response.kvs[0]) if response.kvs else None

    async def list(self, prefix: str) -> list[KVItem]:
        start, end = prefix_range(prefix)
        response = await self._range(start or b"\0", end or b"\0",
                                     sort_order=rpc.RangeRequest.ASCEND,
                                     sort_target=rpc.RangeRequest.KEY)
        return [_item(kv) for kv in response.kvs]

    async def revision(self) -> int:
        return (await self._range(b"\0", count_only=True)).header.revision

    # writes ------------------------------------------------------------------------------
    async def _txn(self, compare, success) -> tuple[bool, Any]:
        client = self.client
        request = rpc.TxnRequest(compare=[c.build_message() for c in compare],
                                 success=client._ops_to_requests(success), failure=[])
        response = await self._call(client.kvstub.Txn(request, timeout=self.timeout,
                                                      metadata=client.metadata))
        return response.succeeded, response

    async def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        client = self.client
        request = rpc.PutRequest(key=key.encode(), value=bytes(value),
                                 lease=lease.id if lease else 0)
        response = await self._call(client.kvstub.Put(request, timeout=self.timeout,
                                                      metadata=client.metadata))
        return response.header.revision

    async def put_many(self, items: list[tuple[str, bytes]], lease: Lease | None = None) -> int:
        """Puts in transactions of at most `TXN_OPS` (etcd's default --max-txn-ops): one
        revision, so one watch response, per transaction instead of per key."""
        revision = 0
        client = self.client
        lease_id = lease.id if lease else 0
        for at in range(0, len(items), TXN_OPS):
            chunk = items[at:at + TXN_OPS]
            if len(chunk) == 1:
                revision = await self.put(chunk[0][0], chunk[0][1], lease)
                continue
            request = rpc.TxnRequest(compare=[], success=[
                rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=bytes(value),
                                                         lease=lease_id))
                for key, value in chunk], failure=[])
            response = await self._call(client.kvstub.Txn(request, timeout=self.timeout,
                                                          metadata=client.metadata))
            revision = response.header.revision
        return revision

    async def delete(self, key: str) -> bool:
        return await self._delete_range(key.encode(), None) > 0

    async def delete_many(self, keys: list[str]) -> int:
        """Deletes in transactions of at most `TXN_OPS`, like `put_many` (each key once: etcd
        refuses a transaction naming a key twice)."""
        keys = list(dict.fromkeys(keys))
        deleted = 0
        client = self.client
        for at in range(0, len(keys), TXN_OPS):
            chunk = keys[at:at + TXN_OPS]
            if len(chunk) == 1:
                deleted += await self.delete(chunk[0])
                continue
            request = rpc.TxnRequest(compare=[], success=[
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))
                for key in chunk], failure=[])
            response = await self._call(client.kvstub.Txn(request, timeout=self.timeout,
                                                          metadata=client.metadata))
            deleted += sum(r.response_delete_range.deleted for r in response.responses)
        return deleted

    async def delete_prefix(self, prefix: str) -> int:
        start, end = prefix_range(prefix)
        return await self._delete_range(start or b"\0", end or b"\0")

    async def _delete_range(self, key: bytes, range_end: bytes | None) -> int:
        client = self.client
        request = rpc.DeleteRangeRequest(key=key)
        if range_end is not None:
            request.range_end = range_end
        response = await self._call(client.kvstub.DeleteRange(
            request, timeout=self.timeout, metadata=client.metadata))
        return response.deleted

    async def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        return await self.compare_and_swap(key, 0, value, lease)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease: Lease | None = None
    ) -> bool:
        raw = key.encode()
        tx = self.client.transactions
        ok, _ = await self._txn([tx.mod(raw) == expected_mod_revision],
                                [tx.put(raw, bytes(value), lease=lease.id if lease else None)])
        return ok

    async def compare_and_delete(self, key: str, expected_mod_revision: int) -> bool:
        if expected_mod_revision <= 0:
            return False
        raw = key.encode()
        tx = self.client.transactions
        ok, response = await self._txn([tx.mod(raw) == expected_mod_revision],
                                       [tx.delete(raw)])
        return ok and response.responses[0].response_delete_range.deleted > 0

    # watches -----------------------------------------------------------------------------
    async def watch(self, prefix: str, after_revision: int = 0) -> AsyncIterator[KVEvent]:
        async with contextlib.aclosing(self.watch_batches(prefix, after_revision)) as batches:
            async for batch in batches:
                for event in batch:
                    yield event

    async def watch_batches(self, prefix: str,
                            after_revision: int = 0) -> AsyncIterator[list[KVEvent]]:
        """One list per etcd watch response (a transaction's puts arrive together)."""
        start, end = prefix_range(prefix)
        key, range_end = start or b"\0", end or b"\0"
        # a revision given by the caller was read from this store: if the store is behind
        # it now, it lost its data (checked again before every resumption)
        check = bool(after_revision)
        if not after_revision:
            after_revision = await self.revision()
        # resume point: the revision being delivered, and the keys of it already yielded
        # (one revision can hold many events, e.g. a delete_prefix)
        resume_revision, delivered = after_revision + 1, set()
        failures = 0
        while True:
            stream = None
            try:
                if failures or check:
                    await self._check_not_reset(prefix, resume_revision)
                    check = False
                stream = await self._open_watch(key, range_end, resume_revision)
                if failures:
                    log.info("etcd watch of %r resumed at revision %d after %d failed "
                             "attempts", prefix, resume_revision, failures)
                    failures = 0
                unbounded = range_end == b"\0"
                async for events in stream:
                    batch, misrouted = [], None
                    for event in events:
                        kv = event.kv
                        raw, revision = kv.key, kv.mod_revision
                        if raw < key or not (unbounded or raw < range_end):
                            misrouted = _Misrouted(f"event for {raw!r} outside the watched "
                                                   "range")
                            break  # what came before it is delivered, then resumed after
                        if revision == resume_revision:
                            if raw in delivered:
                                continue  # replayed after a reconnect
                        else:
                            resume_revision, delivered = revision, set()
                        delivered.add(raw)
                        if event.type == PUT:
                            batch.append(KVEvent("put", raw.decode(), bytes(kv.value),
                                                 revision))
                        else:
                            batch.append(KVEvent("delete", raw.decode(), b"", revision))
                    if batch:
                        yield batch
                    if misrouted is not None:
                        raise misrouted
                    # an idle watch must not keep its last response alive until the next
                    batch = events = event = kv = None
            except KVStoreReset:
                raise
            except KVStoreUnavailable as exc:  # the revision check could not reach etcd
                failures += 1
                log.debug("etcd watch of %r: %s", prefix, exc)
            except etcd_errors.RevisionCompactedError as exc:
                raise KVStoreCompacted(
                    f"cannot resume etcd watch of {prefix!r} at revision {resume_revision}: "
                    f"compacted up to {exc.compacted_revision}") from None
            except (etcd_errors.ClientError, rpc.AioRpcError, TimeoutError, _Misrouted) as exc:
                if self._closed:
                    raise KVStoreUnavailable(f"etcd kvstore ({self.where}) was closed") from None
                failures += 1
                (log.warning if failures == 1 else log.debug)(
                    "etcd watch of %r broke (%s); resuming at revision %d", prefix,
                    self._unavailable(exc), resume_revision)
            finally:
                if stream is not None:
                    await stream.close()
            if self._closed:
                raise KVStoreUnavailable(f"etcd kvstore ({self.where}) was closed")
            await asyncio.sleep(self.retry_interval)

    async def _check_not_reset(self, prefix: str, resume_revision: int) -> None:
        """Before resuming a broken watch: an etcd that came back with a lower revision lost
        its data (wiped data dir, restored snapshot). Resuming at our revision would wait
        silently for a revision the new history reaches much later, skipping everything
        written until then: say so instead (the caller lists again)."""
        current = await self.revision()
        if current < resume_revision - 1:
            raise KVStoreReset(f"etcd at {self.where} is at revision {current}, behind the "
                               f"watch of {prefix!r} (at {resume_revision - 1}): its data "
                               "was reset (or that revision was never reached)")

    async def _open_watch(self, key: bytes, range_end: bytes,
                          start_revision: int) -> _WatchStream:
        """One watch on its own gRPC stream. aetcd multiplexes every watch of a client on one
        stream and binds a "created" answer to whichever watch is being created at that
        moment: a watch cancelled (or timed out) while being created can leave another
        watch receiving its events — seen after etcd outages, when watches are re-created
        at once. A stream per watch cannot mix watches up."""
        return await _WatchStream.open(self.client, key, range_end, start_revision,
                                       self.timeout)

    # leases ------------------------------------------------------------------------------
    async def grant_lease(self, ttl: float) -> Lease:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        client = self.client
        response = await self._call(client.leasestub.LeaseGrant(
            rpc.LeaseGrantRequest(TTL=math.ceil(ttl)), timeout=self.timeout,
            metadata=client.metadata))
        if response.error:
            raise self._unavailable(RuntimeError(response.error))
        return Lease(id=response.ID, ttl=float(response.TTL))

    async def keepalive(self, lease: Lease) -> bool:
        try:
            reply = await self._call(self.client.refresh_lease(lease.id))
        except LeaseNotFound:
            return False
        return reply is not None and reply.TTL > 0

    async def revoke_lease(self, lease: Lease) -> None:
        try:
            await self._call(self.client.revoke_lease(lease.id))
        except LeaseNotFound:
            pass  # already expired: its keys are gone

    # health ------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        try:
            client = self.client
            response = await self._call(client.maintenancestub.Status(
                rpc.StatusRequest(), timeout=self.timeout, metadata=client.metadata))
        except KVStoreUnavailable as exc:
            return {"backend": self.name, "healthy": False, "revision": 0, "detail": str(exc)}
        return {"backend": self.name, "healthy": True, "revision": response.header.revision,
                "detail": f"etcd {response.version} at {self.where}",
                "version": response.version, "db_size": response.dbSize,
                "raft_index": response.raftIndex, "leader": response.leader}


#: the name the plugin skeleton registered first
KvstoreEtcd = EtcdKVStore
