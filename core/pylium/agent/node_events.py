"""A started node capability (routing mode or encryption) as the agent holds it, and how its
blocking backend calls leave the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from pylium.api.node import NodeInfo
from pylium.errors import PyliumError

log = logging.getLogger(__name__)


class NodeEvents:
    """A started node capability (routing mode or encryption) as the agent holds it: the
    backend plus the nodes it was told of and the errors it reported per node. Node events
    come from the cluster's node registry or the API, on the event loop; the backend's calls
    run off it (`off_loop`)."""

    def __init__(self, component: str, name: str, backend: Any, context: Any):
        self.component = component
        self.name = name
        self.backend = backend
        self.context = context
        self.local = context.node
        self.nodes: dict[str, NodeInfo] = {}
        self.errors: dict[str, str] = {}
        self.setup_result: Any = None

    async def setup(self) -> None:
        self.setup_result = await asyncio.to_thread(self.backend.setup_node, self.local)

    @property
    def mtu_overhead(self) -> int:
        return int(getattr(self.backend, "mtu_overhead", 0))

    def node_joined(self, node: NodeInfo) -> None:
        if node.name == self.local.name:
            return
        try:
            off_loop(self.backend.node_joined, node)
        except PyliumError as exc:
            self.errors[node.name] = str(exc)
            raise
        self.errors.pop(node.name, None)
        self.nodes[node.name] = node
        log.info("%s %s: node %s joined (%s, pods %s)", self.component, self.name, node.name,
                 node.ipv4, node.pod_cidr)

    def node_left(self, node: NodeInfo) -> None:
        if node.name == self.local.name:
            return
        off_loop(self.backend.node_left, node)
        self.nodes.pop(node.name, None)
        self.errors.pop(node.name, None)
        log.info("%s %s: node %s left", self.component, self.name, node.name)

    def backend_status(self) -> dict[str, Any]:
        return dict(self.backend.status() or {})

    def close(self) -> None:
        """Agent stop: the datapath keeps carrying traffic (no teardown); drop our fds."""
        self.backend.close()


def off_loop(func, *args):
    """Run a backend call to completion, on a worker thread when called from the event
    loop's thread (pyroute2's synchronous API runs an event loop of its own, which cannot
    nest in a running one). Node events are rare and netlink calls take milliseconds."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return func(*args)
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["value"] = func(*args)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, name="routing-node-event")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")
