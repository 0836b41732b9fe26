"""ipcache sync: every agent publishes its local endpoints under `pylium/state/ip/v1/<ip>`
(on its cluster lease) and keeps the others' in its ipcache as `<ip>/32 → identity`, with
the owning node's address as tunnel endpoint — Cilium's `cilium/state/ip/v1`.

Only entries of nodes the registry knows are installed, so a node that leaves takes its
endpoints with it even before their keys expire. After every (re-)list the installed
entries are reconciled with what the sink really holds: a remote /32 with a tunnel
endpoint that the store no longer has is removed, so nothing stale survives an outage or
an agent restart."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from typing import Any, Protocol

from pylium.api import NodeInfo
from pylium.api.kvstore import KVStore, KVStoreUnavailable, Lease, LeaseNotFound
from pylium.cluster.mirror import PrefixMirror
from pylium.cluster.session import ClusterSession
from pylium.documents import RecordError

log = logging.getLogger(__name__)

IP_PREFIX = "pylium/state/ip/v1/"
#: the least time between two writes of this node's endpoints to the store: a burst of pod
#: starts is published in a transaction per 10 ms, a lone pod start at once
PUBLISH_INTERVAL_S = 0.01


class IPCacheSink(Protocol):
    """Where remote entries go: the BPF ipcache, or a dict for agents without datapath."""

    def upsert(self, cidr: str, identity: int, tunnel_endpoint: str | None) -> None: ...

    def delete(self, cidr: str) -> None: ...

    def dump(self) -> list[dict[str, Any]]:
        """[{"cidr", "identity", "tunnel_endpoint"}] of every entry."""


class DatapathSink:
    """`pylium.datapath.Datapath`'s ipcache map."""

    def __init__(self, datapath: Any):
        self.datapath = datapath

    def upsert(self, cidr: str, identity: int, tunnel_endpoint: str | None) -> None:
        self.datapath.upsert_ipcache(cidr, identity, tunnel_endpoint)

    def delete(self, cidr: str) -> None:
        self.datapath.delete_ipcache(cidr)

    def dump(self) -> list[dict[str, Any]]:
        return self.datapath.dump_ipcache()


class MemorySink:
    """An ipcache in a dict (simulated nodes, agents without datapath)."""

    def __init__(self):
        self.entries: dict[str, tuple[int, str | None]] = {}

    def upsert(self, cidr: str, identity: int, tunnel_endpoint: str | None) -> None:
        self.entries[cidr] = (identity, tunnel_endpoint)

    def delete(self, cidr: str) -> None:
        self.entries.pop(cidr, None)

    def dump(self) -> list[dict[str, Any]]:
        return [{"cidr": c, "identity": i, "tunnel_endpoint": t}
                for c, (i, t) in sorted(self.entries.items())]


def ip_key(ip: str) -> str:
    return IP_PREFIX + ip


def encode_entry(ip: str, identity: int, node: str, node_ip: str, endpoint: str = "") -> bytes:
    return json.dumps({"ip": ip, "identity": identity, "node": node, "node_ip": node_ip,
                       "endpoint": endpoint}, sort_keys=True).encode()


#: the largest ipcache record accepted (bytes)
MAX_RECORD = 4096


def is_ipv4(text: object) -> bool:
    """Dotted-quad IPv4, as strict as `ipaddress` (no leading zeros, no short forms) at a
    fraction of its cost: every node decodes every endpoint's record."""
    if not isinstance(text, str):
        return False
    try:
        socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


_scan_json = json.decoder.JSONDecoder().scan_once


def _load_json(text: str) -> Any:
    """`json.loads(text)`, without its whitespace and type checks when `text` is one JSON
    value and nothing else (as every record we write is); anything else takes
    `json.loads`, which accepts and refuses exactly what it always does."""
    try:
        value, end = _scan_json(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = _OCTET + rb"(?:\." + _OCTET + rb"){3}"
#: a JSON string body without escapes, control characters or non-ASCII bytes
_PLAIN = rb'[^"\\\x00-\x1f\x7f-\xff]'
#: exactly what `encode_entry` writes (sorted keys, default separators) with plain strings,
#: a dotted-quad node_ip and a positive identity: every such record decodes, through
#: `json.loads` and the checks, to the same fields, so it may skip both
_CANONICAL = re.compile(
    rb'\{"endpoint": "' + _PLAIN + rb'*", "identity": ([1-9][0-9]{0,9}), "ip": "' + _PLAIN
    + rb'*", "node": "(' + _PLAIN + rb'+)", "node_ip": "(' + _IPV4 + rb')"\}').fullmatch


def decode_entry(key: str, raw: bytes) -> tuple[int, str, str]:
    """(identity, node, node_ip) of an ipcache record; `RecordError` when it is not one
    (the key must be an IPv4 address, the identity fit the map's u32, node_ip be IPv4).

    Every node decodes every endpoint's record, so this is on the hot path: a record in
    the exact form `encode_entry` writes is read with one regular expression (its fields
    need no further check but the identity's range); anything else goes through
    `_decode_entry_json`, which accepts and refuses the same records either way."""
    match = _CANONICAL(raw) if len(raw) <= MAX_RECORD else None
    if match is not None:
        identity = int(match[1])
        if identity <= 0xFFFFFFFF and is_ipv4(key[len(IP_PREFIX):]):
            return identity, match[2].decode(), match[3].decode()
    return _decode_entry_json(key, raw)


def _decode_entry_json(key: str, raw: bytes) -> tuple[int, str, str]:
    """`decode_entry` for any record: a record is at most `MAX_RECORD` bytes (ours are
    ~120), which bounds its nesting too (the JSON parser refuses what would recurse too
    deep), parsed once, then every field checked."""
    if len(raw) > MAX_RECORD:
        raise RecordError(f"ipcache record {key}: {len(raw)} bytes is more than the limit "
                          f"of {MAX_RECORD}")
    try:
        data = _load_json(bytes(raw).decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RecordError(f"ipcache record {key}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError(f"ipcache record {key}: expected a JSON object")
    try:
        identity, node, node_ip = data["identity"], data["node"], data["node_ip"]
    except KeyError as exc:
        raise RecordError(f"ipcache record {key}: {exc.args[0]}: required field "
                          "missing") from None
    for what, text in (("key", key[len(IP_PREFIX):]), ("node_ip", node_ip)):
        if not is_ipv4(text):
            raise RecordError(f"ipcache record {key}: {what}: {text!r} is not an IPv4 "
                              "address")
    if isinstance(identity, bool) or not isinstance(identity, int) or \
            not 0 < identity <= 0xFFFFFFFF:
        raise RecordError(f"ipcache record {key}: identity: {identity!r} is not an identity")
    if not isinstance(node, str) or not node:
        raise RecordError(f"ipcache record {key}: node: expected a non-empty string")
    return identity, node, node_ip


def _cidr(ip: str) -> str:
    return f"{ip}/32"


class IPCacheSync:
    def __init__(self, kvstore: KVStore, session: ClusterSession, local: NodeInfo,
                 sink: IPCacheSink, nodes: Any | None = None, retry_interval: float = 0.5,
                 publish_interval: float = PUBLISH_INTERVAL_S):
        self.kvstore = kvstore
        self.session = session
        self.local = local
        self.sink = sink
        #: the `NodeRegistry` (None: install every remote entry, whatever its node)
        self.nodes = nodes
        self.retry_interval = retry_interval
        #: the least time between two writes of local changes (`_publish_loop`)
        self.publish_interval = publish_interval
        #: local endpoints: ip → encoded record we want in the store, and what is there
        self.local_entries: dict[str, bytes] = {}
        self.published: dict[str, bytes] = {}
        #: remote entries from the store: ip → (identity, node, node_ip)
        self.remote: dict[str, tuple[int, str, str]] = {}
        self.by_node: dict[str, set[str]] = {}
        #: what this sync put in the sink: ip → (identity, tunnel endpoint)
        self.installed: dict[str, tuple[int, str | None]] = {}
        #: node name → (its registry record, its address as text): asked for every remote
        #: endpoint, so kept while the registry keeps the same record
        self._node_ips: dict[str, tuple[Any, str]] = {}
        self.mirror = PrefixMirror(kvstore, IP_PREFIX, self._changed, on_synced=self.reconcile,
                                   reset_grace=session.reset_grace,
                                   on_changes=self._changed_many)
        self._dirty = asyncio.Event()
        self._publisher: asyncio.Task | None = None
        self.publish_errors = 0
        session.on_new_lease(self.republish)
        session.on_resync(self.resync)
        session.on_wipe_noticed(self.mirror.store_wiped)
        if nodes is not None:
            nodes.subscribe(self._node_joined, self._node_left)

    # local side ------------------------------------------------------------------------------
    def set_local(self, ip: str, identity: int, endpoint: str = "") -> None:
        self.local_entries[ip] = encode_entry(ip, int(identity), self.local.name,
                                              str(self.local.ipv4), endpoint)
        self._dirty.set()

    def remove_local(self, ip: str) -> None:
        if self.local_entries.pop(ip, None) is not None:
            self._dirty.set()

    def replace_local(self, entries: dict[str, tuple[int, str]]) -> None:
        """The whole local set at once: ip → (identity, endpoint name)."""
        wanted = {ip: encode_entry(ip, int(identity), self.local.name, str(self.local.ipv4),
                                   name) for ip, (identity, name) in entries.items()}
        if wanted != self.local_entries:
            self.local_entries = wanted
            self._dirty.set()

    async def flush(self) -> None:
        """Write local changes to the store (raises KVStoreUnavailable if it is down)."""
        self._dirty.clear()
        lease = self.session.lease
        try:
            gone = [ip for ip in self.published if ip not in self.local_entries]
            if gone:  # one transaction, like the writes below
                await self.kvstore.delete_many([ip_key(ip) for ip in gone])
                for ip in gone:
                    del self.published[ip]
            changed = [(ip, value) for ip, value in list(self.local_entries.items())
                       if self.published.get(ip) != value]
            if changed:  # one transaction (one revision, one watch event batch) per chunk
                await self.kvstore.put_many([(ip_key(ip), v) for ip, v in changed], lease=lease)
                for ip, value in changed:
                    self.published[ip] = value
        except BaseException:
            self._dirty.set()
            raise

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            try:
                await self.flush()
            except (KVStoreUnavailable, LeaseNotFound):
                # the session notices too: it renews the lease and republishes
                self.publish_errors += 1
                await asyncio.sleep(self.retry_interval)
            except Exception:
                self.publish_errors += 1
                log.exception("publishing local endpoints failed")
                await asyncio.sleep(self.retry_interval)
            else:
                # a lone change goes out at once; the pods of a node starting together go
                # out in a few transactions (one store write, one revision and one watch
                # answer on every node each) instead of one per pod
                await asyncio.sleep(self.publish_interval)

    async def republish(self, lease: Lease) -> None:
        """The lease was replaced: every local key is gone or on the dead lease; rewrite."""
        self.published.clear()
        await self.flush()

    async def _forget_own_stale(self) -> None:
        """Delete keys naming this node that no local endpoint backs (an endpoint deleted
        while the store was down, or before this agent restarted)."""
        for item in await self.kvstore.list(IP_PREFIX):
            ip = item.key[len(IP_PREFIX):]
            try:
                node = decode_entry(item.key, item.value)[1]
            except RecordError:
                continue
            if node == self.local.name and ip not in self.local_entries:
                await self.kvstore.compare_and_delete(item.key, item.mod_revision)
                self.published.pop(ip, None)
            elif (node == self.local.name and self.local_entries.get(ip) == item.value
                  and self.session.lease is not None and item.lease == self.session.lease.id):
                # already there on this session's lease; a previous run's key (its lease
                # runs out soon after a restart) is rewritten onto ours by the next flush
                self.published[ip] = item.value

    # lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self._forget_own_stale()
        self.published = {ip: v for ip, v in self.published.items()
                          if self.local_entries.get(ip) == v}
        await self.flush()
        self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())
        self.mirror.start()
        await self.mirror.synced.wait()

    async def resync(self) -> None:
        self.published.clear()
        await self._forget_own_stale()
        await self.flush()
        await self.mirror.resync()

    async def close(self) -> None:
        await self.mirror.close()
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)

    # remote side -----------------------------------------------------------------------------
    def _changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        ip = key[len(IP_PREFIX):]
        previous = self.remote.pop(ip, None)
        if previous is not None:
            self.by_node.get(previous[1], set()).discard(ip)
        if new is not None:
            try:
                entry = decode_entry(key, new)
            except RecordError as exc:
                log.warning("ignoring unreadable ipcache record %s: %s", key, exc)
                entry = None
            if entry is not None and entry[1] != self.local.name:
                self.remote[ip] = entry
                self.by_node.setdefault(entry[1], set()).add(ip)
        self._apply(ip)

    def _changed_many(self, changes: list[tuple[str, bytes | None, bytes | None]]) -> None:
        """A batch of `_changed` (a watch response: every node applies every endpoint's
        change, so this is the cluster's hot path): decoded in one loop, each address
        applied once, the nodes' addresses looked up once per batch."""
        remote, by_node, installed, sink = self.remote, self.by_node, self.installed, self.sink
        local, start = self.local.name, len(IP_PREFIX)
        own, published = self.local_entries, self.published
        node_ips: dict[str, str | None] = {}
        for key, _old, new in changes:
            ip = key[start:]
            try:
                previous = remote.pop(ip, None)
                if previous is not None:
                    by_node.get(previous[1], set()).discard(ip)
                entry = None
                # this node's own record coming back (the bytes it encoded, naming itself):
                # nothing to install, so not decoded (a pod start on this node used to
                # decode its own JSON record once more here)
                if new is not None and new != own.get(ip) and new != published.get(ip):
                    try:
                        entry = decode_entry(key, new)
                    except RecordError as exc:
                        log.warning("ignoring unreadable ipcache record %s: %s", key, exc)
                    if entry is not None and entry[1] != local:
                        remote[ip] = entry
                        members = by_node.get(entry[1])
                        if members is None:
                            members = by_node[entry[1]] = set()
                        members.add(ip)
                    else:
                        entry = None
                want = None
                if entry is not None:
                    node = entry[1]
                    if self.nodes is None:
                        want = entry[0], entry[2]
                    else:
                        node_ip = node_ips.get(node, False)
                        if node_ip is False:
                            node_ip = node_ips[node] = self._node_ip(node)
                        if node_ip is not None:
                            want = entry[0], node_ip
                have = installed.get(ip)
                if want == have:
                    continue
                if want is None:
                    sink.delete(ip + "/32")
                    del installed[ip]
                else:
                    sink.upsert(ip + "/32", want[0], want[1])
                    installed[ip] = want
            except Exception:  # one bad entry (a full map) must not drop the rest
                log.exception("applying %s of %s failed",
                              "delete" if new is None else "put", key)

    def _node_ip(self, node: str) -> str | None:
        """The address of registry member `node` as text (None: not a member)."""
        known = self.nodes.nodes.get(node)
        if known is None:
            return None  # not (or no longer) a member: its endpoints are not reachable
        text = self._node_ips.get(node)
        if text is None or text[0] is not known:  # a node record replaced: its address
            text = self._node_ips[node] = (known, str(known.ipv4))
        return text[1]

    def desired(self, ip: str) -> tuple[int, str | None] | None:
        entry = self.remote.get(ip)
        if entry is None:
            return None
        identity, node, node_ip = entry
        if self.nodes is not None:
            node_ip = self._node_ip(node)
            if node_ip is None:
                return None
        return identity, node_ip

    def _apply(self, ip: str) -> None:
        want = self.desired(ip)
        have = self.installed.get(ip)
        if want == have:
            return
        if want is None:
            self.sink.delete(_cidr(ip))
            del self.installed[ip]
        else:
            self.sink.upsert(_cidr(ip), want[0], want[1])
            self.installed[ip] = want

    def _node_joined(self, node: NodeInfo) -> None:
        for ip in list(self.by_node.get(node.name, ())):
            self._apply(ip)

    def _node_left(self, node: NodeInfo) -> None:
        self._node_ips.pop(node.name, None)
        for ip in list(self.by_node.get(node.name, ())):
            self._apply(ip)

    def reconcile(self) -> dict[str, int]:
        """Make the sink hold exactly the desired remote entries: remove remote-looking /32s
        (tunnel endpoint set) nobody wants, (re)install missing or different ones."""
        removed = added = 0
        actual = {}
        for row in self.sink.dump():
            cidr = row["cidr"]
            if cidr.endswith("/32") and row.get("tunnel_endpoint"):
                actual[cidr[:-3]] = (int(row["identity"]), row["tunnel_endpoint"])
        for ip in set(actual) | set(self.installed):
            if self.desired(ip) is None and ip not in self.local_entries:
                if ip in actual or ip in self.installed:
                    self.sink.delete(_cidr(ip))
                    self.installed.pop(ip, None)
                    removed += 1
        for ip in self.remote:
            want = self.desired(ip)
            if want is not None and actual.get(ip) != want:
                self.sink.upsert(_cidr(ip), want[0], want[1])
                self.installed[ip] = want
                added += 1
            elif want is not None:
                self.installed[ip] = want
        if removed or added:
            log.info("ipcache reconciled with the store: %d stale removed, %d (re)installed",
                     removed, added)
        return {"removed": removed, "installed": added}

    # checks ----------------------------------------------------------------------------------
    async def compare_with_store(self) -> dict[str, Any]:
        """This node's ipcache against the store right now: what is missing, stale or
        different (all empty when converged)."""
        items = await self.kvstore.list(IP_PREFIX)
        known = set(self.nodes.nodes) if self.nodes is not None else None
        want: dict[str, tuple[int, str]] = {}
        for item in items:
            try:
                identity, node, node_ip = decode_entry(item.key, item.value)
            except RecordError:
                continue  # never installed either (`_changed` skips it)
            if node == self.local.name or (known is not None and node not in known):
                continue
            want[item.key[len(IP_PREFIX):]] = (identity, node_ip)
        have = {row["cidr"][:-3]: (int(row["identity"]), row["tunnel_endpoint"])
                for row in self.sink.dump()
                if row["cidr"].endswith("/32") and row.get("tunnel_endpoint")}
        return {"store": len(want), "ipcache": len(have),
                "missing": sorted(ip for ip in want if ip not in have),
                "stale": sorted(ip for ip in have if ip not in want),
                "different": sorted(ip for ip in want if ip in have and have[ip] != want[ip])}

    def status(self) -> dict[str, Any]:
        return {"local_endpoints": len(self.local_entries), "published": len(self.published),
                "remote_endpoints": len(self.installed), "lists": self.mirror.lists,
                "events": self.mirror.events}
