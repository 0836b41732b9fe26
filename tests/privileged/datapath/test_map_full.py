"""Full maps fail closed: a policy that needs more entries than an endpoint's policy map
holds is refused whole (clear error, a log line, the `pylium_bpf_map_full` metric) and the
endpoint keeps enforcing its last good policy — never allow-all, never empty. A full
ipcache refuses the new entry the same way and keeps every entry it had."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from pylium.datapath import Datapath, EndpointInfo
from pylium.datapath.datapath import MapFull
from pylium.datapath.libbpf import map_info
from pylium.flow.component import FlowObserver
from pylium.flow.metrics import make_registry
from pylium.policy.mapstate import PROTO_TCP, Direction, EndpointPolicy, PolicyEntry, PolicyKey

from .conftest import BPF_CACHE
from .netns_helpers import NetnsWorker, Topology, bpffs_root

A, B = ("10.214.0.10", 1201), ("10.214.0.11", 1202)
ING = Direction.INGRESS


@pytest.fixture
def small_node():
    """A node whose endpoint policy maps hold 8 entries (meta entry included)."""
    topo = Topology("mapfull")
    worker = NetnsWorker(topo.node)
    dp = Datapath(bpffs_root(), cache_dir=BPF_CACHE, policy_capacity=8)
    try:
        worker.run(dp.open)
        eps = {}
        for ep_id, (name, (ip, identity)) in enumerate({"a": A, "b": B}.items(), start=1):
            pod = topo.add_pod(name, ip)
            eps[name] = EndpointInfo(ep_id, ip, pod["ifindex"], pod["mac"], pod["host_mac"],
                                     identity)
            worker.run(dp.attach_endpoint, eps[name])
        yield SimpleNamespace(dp=dp, worker=worker, eps=eps)
    finally:
        try:
            worker.run(dp.destroy)
        finally:
            worker.close()
            topo.destroy()


def _ports(ports, revision) -> EndpointPolicy:
    return EndpointPolicy(True, True, {PolicyKey(A[1], ING, PROTO_TCP, p, 16): PolicyEntry()
                                       for p in ports}, revision)


def test_policy_too_big_for_the_map_keeps_the_last_good_policy(small_node, caplog):
    n = small_node
    b = n.eps["b"].ep_id
    n.worker.run(n.dp.update_policy, b, _ports([80, 81, 82], 1))
    trace = lambda port: n.worker.run(n.dp.trace, b, "ingress", A[0], B[0], 40000, port,  # noqa: E731
                                      PROTO_TCP)
    assert trace(80)["verdict"] == "allowed" and trace(90)["action"] == "dropped"
    before = n.worker.run(n.dp.dump_policy, b)
    with caplog.at_level(logging.ERROR, logger="pylium.datapath.datapath"), \
            pytest.raises(MapFull) as err:
        n.worker.run(n.dp.update_policy, b, _ports(range(90, 98), 2))  # 8 + meta > 8
    assert str(err.value) == ("policy of endpoint 2 NOT updated: it needs 9 policy map "
                              "entries, more than the map holds (8); the previous policy "
                              "stays in force")
    assert str(err.value) in caplog.text
    assert n.dp.map_full == {"policy": 1}
    # the last good policy, whole: same entries, same revision; 80 allowed, 90 still denied
    assert n.worker.run(n.dp.dump_policy, b) == before
    assert trace(80)["verdict"] == "allowed" and trace(90)["action"] == "dropped"
    # exactly at capacity fits
    n.worker.run(n.dp.update_policy, b, _ports(range(90, 97), 3))
    assert trace(96)["verdict"] == "allowed" and trace(80)["action"] == "dropped"
    # the metric
    observer = FlowObserver("mapfull-node")
    observer.daemon = SimpleNamespace(components={"datapath": n.dp}, started_at=time.time(),
                                      config=None)
    text = generate_latest(make_registry(observer)[0]).decode()
    assert 'pylium_bpf_map_full_total{map_name="policy"} 1.0' in text
    assert 'pylium_bpf_map_full_total{map_name="ipcache"} 0.0' in text


def test_full_ipcache_refuses_the_new_entry_and_keeps_the_others(small_node, caplog):
    n = small_node
    size = map_info(n.dp.ipcache.fd).max_entries
    have = len(n.worker.run(n.dp.dump_ipcache))

    def fill():
        for i in range(size - have):
            n.dp.upsert_ipcache(f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}/32", 5000)
    n.worker.run(fill)
    with caplog.at_level(logging.ERROR, logger="pylium.datapath.datapath"), \
            pytest.raises(MapFull, match=rf"ipcache entry 192.0.2.1/32 NOT added: the ipcache "
                                         rf"is full \({size} entries\)"):
        n.worker.run(n.dp.upsert_ipcache, "192.0.2.1/32", 5001)
    assert "the ipcache is full" in caplog.text and n.dp.map_full == {"ipcache": 1}
    assert n.worker.run(n.dp.lookup_ipcache, "10.100.0.7") == 5000
    assert len(n.worker.run(n.dp.dump_ipcache)) == size  # nothing evicted
    # an existing entry can still change (no new slot needed)
    n.worker.run(n.dp.upsert_ipcache, "10.100.0.7/32", 5002)
    assert n.worker.run(n.dp.lookup_ipcache, "10.100.0.7") == 5002
