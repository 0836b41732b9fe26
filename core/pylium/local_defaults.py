"""The embedded defaults for one machine with no cluster: a routing mode that refuses other
nodes and an orchestrator that waits for the API."""

from __future__ import annotations

from pylium.api import NodeInfo, Orchestrator, RoutingMode
from pylium.errors import PluginError


class LocalRouting(RoutingMode):
    """Pods on this node only; remote nodes need an overlay or native routing plugin."""

    name = "local"
    mtu_overhead = 0

    def setup_node(self, local: NodeInfo) -> None:
        self.local = local

    def node_joined(self, node: NodeInfo) -> None:
        raise PluginError(
            f"node {node.name} joined, but routing mode 'local' is single-node; "
            "select vxlan, geneve or native routing"
        )

    def node_left(self, node: NodeInfo) -> None:
        return None

    def teardown(self) -> None:
        return None


class StandaloneOrchestrator(Orchestrator):
    """Endpoints and policies arrive through the agent API; nothing to watch."""

    name = "standalone"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
