"""Agent component "routing": runs the routing-mode backend selected by `routing_mode`
(with `plugin_options[<mode>]`), sets the node up and takes node join/leave events (from the
cluster's node registry or the API) to it. The pod MTU the endpoint manager wires veths with
is the underlay MTU minus the mode's overhead.

Switching modes is a config change plus an agent restart: at start the component empties
the routing slot and removes pylium's programs from the underlay link, so what the previous
mode left cannot carry traffic; the new mode then sets up its own."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from pylium.api.routing import NodeInfo
from pylium.datapath import netns as plumbing
from pylium.datapath import tc
from pylium.errors import ConfigError, PluginError, PyliumError
from pylium.routing.base import RoutingContext

log = logging.getLogger(__name__)

DEFAULT_MTU = 1500


class Routing:
    """`daemon.components["routing"]`: the selected backend plus the nodes it was told of."""

    def __init__(self, name: str, backend: Any, context: RoutingContext):
        self.name = name
        self.backend = backend
        self.context = context
        self.local = context.node
        self.pod_mtu = context.underlay_mtu - int(getattr(backend, "mtu_overhead", 0))
        self.nodes: dict[str, NodeInfo] = {}
        self.errors: dict[str, str] = {}

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
        log.info("routing %s: node %s joined (%s, pods %s)", self.name, node.name, node.ipv4,
                 node.pod_cidr)

    def node_left(self, node: NodeInfo) -> None:
        if node.name == self.local.name:
            return
        off_loop(self.backend.node_left, node)
        self.nodes.pop(node.name, None)
        self.errors.pop(node.name, None)
        log.info("routing %s: node %s left", self.name, node.name)

    def status(self) -> dict[str, Any]:
        extra = self.backend.status() if hasattr(self.backend, "status") else {}
        return {
            "mode": self.name,
            "node": {"name": self.local.name, "ipv4": str(self.local.ipv4),
                     "pod_cidr": str(self.local.pod_cidr)},
            "underlay": {"ifname": self.context.underlay_ifname,
                         "mtu": self.context.underlay_mtu},
            "mtu_overhead": int(getattr(self.backend, "mtu_overhead", 0)),
            "pod_mtu": self.pod_mtu,
            "nodes": [{"name": n.name, "ipv4": str(n.ipv4), "pod_cidr": str(n.pod_cidr)}
                      for n in sorted(self.nodes.values(), key=lambda n: n.name)],
            "errors": dict(self.errors),
            **{k: v for k, v in extra.items() if k != "nodes"},
        }

    def close(self) -> None:
        """Agent stop: the datapath keeps carrying traffic (no teardown); drop our fds."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


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


def _reset_previous_mode(datapath: Any, underlay_ifname: str) -> None:
    if datapath is not None:
        datapath.set_routing_slot(0, None)
    if underlay_ifname:
        index = socket.if_nametoindex(underlay_ifname)
        for point in (tc.INGRESS, tc.EGRESS):
            tc.detach(index, point)


def _context(daemon, mode: str) -> RoutingContext:
    cfg = daemon.config
    node_ip = cfg.node_ip
    underlay = ""
    mtu = DEFAULT_MTU
    if node_ip:
        underlay = plumbing.link_with_address(node_ip) or ""
        if underlay:
            mtu = plumbing.link_mtu(underlay)
    if mode != "local":
        if not node_ip:
            raise ConfigError(f"node_ip: routing mode {mode!r} needs this node's underlay "
                              "address")
        if not underlay:
            raise ConfigError(f"node_ip: no interface in the agent's network namespace holds "
                              f"{node_ip}")
    return RoutingContext(
        datapath=daemon.components.get("datapath"),
        node=NodeInfo(name=cfg.node_name, ipv4=node_ip or "0.0.0.0", pod_cidr=cfg.pod_cidr),
        underlay_ifname=underlay, underlay_mtu=mtu)


async def start(daemon) -> Routing:
    cfg = daemon.config
    record = daemon.plugins.select("routing", cfg.routing_mode)
    options = cfg.plugin_options.get(record.name, {})
    context = await asyncio.to_thread(_context, daemon, record.name)
    # what a previous mode left must not carry traffic; "local" never touches interfaces
    await asyncio.to_thread(_reset_previous_mode, context.datapath,
                            context.underlay_ifname if record.name != "local" else "")
    try:
        backend = record.backend(context, options)
        await asyncio.to_thread(backend.setup_node, context.node)
    except PyliumError:
        raise
    except Exception as exc:  # a plugin bug: one line naming the plugin
        log.debug("routing mode %s failed to set up", record.name, exc_info=True)
        raise PluginError(f"routing mode {record.name!r} failed to set up the node: "
                          f"{type(exc).__name__}: {exc}") from exc
    routing = Routing(record.name, backend, context)
    log.info("routing mode %s on %s (underlay %s, mtu %d, pod mtu %d)", record.name,
             context.node.ipv4, context.underlay_ifname or "-", context.underlay_mtu,
             routing.pod_mtu)
    return routing
