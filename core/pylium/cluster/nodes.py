"""The node registry: this node's `NodeInfo` under `pylium/state/nodes/v1/<name>` (on the
cluster lease), every other node followed through a `PrefixMirror`.

A node appears → `on_joined(node)`; its record changes → `on_joined(new)` again (an
update); its key goes (deregistered, or its lease expired because the agent died) →
`on_left(node)`. Cilium's `cilium node list` reads the same view."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pylium.api import NodeInfo
from pylium.api.kvstore import KVStore, Lease
from pylium.cluster.mirror import PrefixMirror
from pylium.cluster.session import ClusterSession
from pylium.documents import RecordError, load_record

log = logging.getLogger(__name__)

NODES_PREFIX = "pylium/state/nodes/v1/"

NodeCallback = Callable[[NodeInfo], None]


def node_key(name: str) -> str:
    return NODES_PREFIX + name


def encode_node(node: NodeInfo, **extra: Any) -> bytes:
    return json.dumps({"name": node.name, "ipv4": str(node.ipv4),
                       "pod_cidr": str(node.pod_cidr), "labels": dict(node.labels),
                       "encryption_key": node.encryption_key, **extra},
                      sort_keys=True).encode()


def decode_node(raw: bytes) -> tuple[NodeInfo, dict[str, Any]]:
    """(NodeInfo, the record's other fields); `RecordError` when the record is not one."""
    data = load_record(raw, "node record")
    if not isinstance(data, dict):
        raise RecordError("node record: expected a JSON object")
    name, labels = data.pop("name", None), data.pop("labels", None) or {}
    key = data.pop("encryption_key", None) or ""
    if not isinstance(name, str) or not name:
        raise RecordError("node record: name: expected a non-empty string")
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise RecordError("node record: labels: expected a mapping of strings")
    if not isinstance(key, str):
        raise RecordError("node record: encryption_key: expected a string")
    try:
        node = NodeInfo(name=name, ipv4=str(data.pop("ipv4")),
                        pod_cidr=str(data.pop("pod_cidr")), labels=labels, encryption_key=key)
    except KeyError as exc:
        raise RecordError(f"node record: {exc.args[0]}: required field missing") from None
    except ValueError as exc:
        raise RecordError(f"node record: {exc}") from None
    return node, data


class NodeRegistry:
    def __init__(self, kvstore: KVStore, session: ClusterSession, local: NodeInfo,
                 on_joined: NodeCallback | None = None, on_left: NodeCallback | None = None,
                 extra: dict[str, Any] | None = None):
        self.kvstore = kvstore
        self.session = session
        self.local = local
        self.extra = {"registered_at": round(time.time(), 3), **(extra or {})}
        self._joined = [on_joined] if on_joined else []
        self._left = [on_left] if on_left else []
        #: other nodes by name
        self.nodes: dict[str, NodeInfo] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.mirror = PrefixMirror(kvstore, NODES_PREFIX, self._changed,
                                   reset_grace=session.reset_grace)
        session.on_new_lease(self.publish)
        session.on_resync(self.resync)

    def subscribe(self, on_joined: NodeCallback | None = None,
                  on_left: NodeCallback | None = None) -> None:
        if on_joined:
            self._joined.append(on_joined)
        if on_left:
            self._left.append(on_left)

    async def start(self) -> None:
        await self.publish(self.session.lease)
        self.mirror.start()
        await self.mirror.synced.wait()

    async def publish(self, lease: Lease | None = None) -> None:
        await self.kvstore.put(node_key(self.local.name),
                               encode_node(self.local, **self.extra),
                               lease=lease or self.session.lease)

    async def resync(self) -> None:
        if await self.kvstore.get(node_key(self.local.name)) is None:
            await self.publish()
        await self.mirror.resync()

    def _changed(self, key: str, old: bytes | None, new: bytes | None) -> None:
        name = key[len(NODES_PREFIX):]
        if name == self.local.name:
            return
        if new is None:
            node = self.nodes.pop(name, None)
            self.records.pop(name, None)
            if node is not None:
                log.info("node %s (%s) left", name, node.ipv4)
                for callback in list(self._left):
                    _safe(callback, node, "left")
            return
        try:
            node, extra = decode_node(new)
        except RecordError as exc:
            log.warning("ignoring unreadable node record %s: %s", key, exc)
            return
        if node.name != name:
            log.warning("ignoring node record %s: it names node %r", key, node.name)
            return
        previous = self.nodes.get(name)
        self.nodes[name] = node
        self.records[name] = extra
        if previous == node:
            return
        log.info("node %s %s (%s, pod CIDR %s)", name, "updated" if previous else "joined",
                 node.ipv4, node.pod_cidr)
        for callback in list(self._joined):
            _safe(callback, node, "joined")

    def node_ip(self, name: str) -> str | None:
        if name == self.local.name:
            return str(self.local.ipv4)
        node = self.nodes.get(name)
        return str(node.ipv4) if node is not None else None

    def list(self) -> list[dict[str, Any]]:
        """Every node this agent knows, itself included, sorted by name."""
        rows = [_row(self.local, {**self.extra}, local=True)]
        rows += [_row(node, self.records.get(name, {}), local=False)
                 for name, node in self.nodes.items()]
        return sorted(rows, key=lambda r: r["name"])

    async def close(self, deregister: bool = False) -> None:
        await self.mirror.close()
        if deregister:
            await self.kvstore.delete(node_key(self.local.name))


def _row(node: NodeInfo, extra: dict[str, Any], local: bool) -> dict[str, Any]:
    return {"name": node.name, "ipv4": str(node.ipv4), "pod_cidr": str(node.pod_cidr),
            "labels": dict(node.labels), "encryption_key": node.encryption_key,
            "local": local, **{k: v for k, v in extra.items() if k not in ("local",)}}


def _safe(callback: NodeCallback, node: NodeInfo, what: str) -> None:
    try:
        callback(node)
    except Exception:
        log.exception("node %s callback for %s failed", what, node.name)
