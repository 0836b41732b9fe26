"""Nodes an orchestrator feeds (Kubernetes Node objects) into the node registry beside the
KV store's records: the same joined/left callbacks, the KV store's record winning where an
agent published one, the local node only annotated."""

from __future__ import annotations

import asyncio

import pytest
from pylium.api import NodeInfo
from pylium.cluster.sim import SimulatedNode
from pylium.kvstore.embedded import EmbeddedKVStore

from .test_cluster_sync import until


def test_orchestrator_nodes_join_and_leave_beside_the_kvstore_ones(tmp_path):
    path = tmp_path / "kv.sqlite3"

    async def store():
        kv = EmbeddedKVStore({"path": str(path), "sweep_interval": 0.1}, tmp_path)
        await kv.open()
        return kv

    async def run():
        a = await SimulatedNode(await store(), "src-a", "192.168.78.1", "10.78.1.0/24").start()
        b = await SimulatedNode(await store(), "src-b", "192.168.78.2", "10.78.2.0/24").start()
        try:
            await until(lambda: "src-b" in a.registry.nodes, what="b in a's registry")
            reg = a.registry
            joined_before = list(a.joined)

            # a node only Kubernetes knows: joins through the same callbacks
            only = NodeInfo(name="k8s-only", ipv4="192.168.78.9", pod_cidr="10.78.9.0/24",
                            labels={"zone": "z1"})
            reg.set_external("kubernetes", only, ready=False)
            assert reg.nodes["k8s-only"] == only
            assert a.joined[len(joined_before):] == ["k8s-only"]
            rows = {r["name"]: r for r in reg.list()}
            assert rows["k8s-only"]["sources"] == ["kubernetes"]
            assert rows["k8s-only"]["ready"] is False and not rows["k8s-only"]["local"]
            # an update with the same node changes nothing; a new address is an update
            reg.set_external("kubernetes", only, ready=True)
            assert a.joined.count("k8s-only") == 1
            moved = NodeInfo(name="k8s-only", ipv4="192.168.78.10", pod_cidr="10.78.9.0/24")
            reg.set_external("kubernetes", moved)
            assert a.joined.count("k8s-only") == 2 and reg.nodes["k8s-only"] == moved

            # b published itself in the KV store: its record wins over the Node object's
            stale = NodeInfo(name="src-b", ipv4="192.168.78.99", pod_cidr="10.78.99.0/24")
            reg.set_external("kubernetes", stale)
            assert str(reg.nodes["src-b"].ipv4) == "192.168.78.2"
            assert reg.sources_of("src-b") == ["kvstore", "kubernetes"]
            assert a.joined.count("src-b") == 1  # no flap to the weaker view

            # the local node is annotated (labels, source), never "joined"
            reg.set_external("kubernetes", NodeInfo(name="src-a", ipv4="192.168.78.1",
                                                    pod_cidr="10.78.1.0/24",
                                                    labels={"role": "worker"}))
            assert "src-a" not in reg.nodes
            local = next(r for r in reg.list() if r["local"])
            assert local["sources"] == ["local", "kubernetes"]
            assert local["labels"] == {"role": "worker"}

            # Kubernetes forgets k8s-only: it leaves
            reg.remove_external("kubernetes", "k8s-only")
            assert "k8s-only" not in reg.nodes and a.left == ["k8s-only"]
            reg.remove_external("kubernetes", "k8s-only")  # idempotent
            assert a.left == ["k8s-only"]

            # b's agent goes: the Node object's view remains, as an update
            await b.stop()
            await until(lambda: "src-b" in reg.nodes
                        and str(reg.nodes["src-b"].ipv4) == "192.168.78.99",
                        what="b falls back to the Kubernetes view")
            assert "src-b" not in a.left
            assert reg.sources_of("src-b") == ["kubernetes"]
            reg.remove_external("kubernetes", "src-b")
            assert "src-b" not in reg.nodes and a.left == ["k8s-only", "src-b"]

            with pytest.raises(ValueError):
                reg.set_external("kvstore", only)
        finally:
            for node in (a, b):
                try:
                    await node.stop()
                except Exception:
                    pass
                await node.kvstore.close()

    asyncio.run(run())
