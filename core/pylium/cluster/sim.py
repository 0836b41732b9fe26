"""A node without datapath or agent: session + node registry + ipcache sync on a memory
sink. Benchmarks run a hundred of these against one store; tests use them to check the
sync logic without root."""

from __future__ import annotations

from pylium.api import NodeInfo
from pylium.api.kvstore import KVStore
from pylium.cluster.ipcache import IPCacheSync, MemorySink
from pylium.cluster.nodes import NodeRegistry
from pylium.cluster.session import ClusterSession


class SimulatedNode:
    def __init__(self, kvstore: KVStore, name: str, ipv4: str, pod_cidr: str,
                 lease_ttl: float = 15.0):
        self.kvstore = kvstore
        self.info = NodeInfo(name=name, ipv4=ipv4, pod_cidr=pod_cidr)
        self.session = ClusterSession(kvstore, ttl=lease_ttl)
        self.joined: list[str] = []
        self.left: list[str] = []
        self.registry = NodeRegistry(kvstore, self.session, self.info,
                                     on_joined=lambda n: self.joined.append(n.name),
                                     on_left=lambda n: self.left.append(n.name))
        self.sink = MemorySink()
        self.ipcache = IPCacheSync(kvstore, self.session, self.info, self.sink,
                                   nodes=self.registry)

    async def start(self) -> SimulatedNode:
        await self.session.open()
        await self.registry.start()
        await self.ipcache.start()
        self.session.start()
        return self

    async def stop(self, revoke: bool = True) -> None:
        """Leave: with `revoke` the keys go now (clean shutdown); without, they stay until
        the lease expires (a crash)."""
        await self.ipcache.close()
        await self.registry.close()
        await self.session.close(revoke=revoke)
