"""Fixtures: a node netns with pods, and a `Datapath` opened inside that netns (every call
runs on a worker thread that joined it), pinned under a unique /sys/fs/bpf/pylium-test-*."""

from __future__ import annotations

from pathlib import Path

import pytest
from pylium.datapath import Datapath, EndpointInfo  # noqa: E402

from .netns_helpers import NetnsWorker, Topology, bpffs_root  # noqa: E402

BPF_CACHE = Path("/tmp/pylium-test-bpf-cache")


class InNetns:
    """Proxy: `proxy.method(...)` runs `datapath.method(...)` on the netns worker thread."""

    def __init__(self, datapath: Datapath, worker: NetnsWorker):
        self._dp = datapath
        self._worker = worker

    def __getattr__(self, name):
        attr = getattr(self._dp, name)
        if not callable(attr):
            return attr
        return lambda *a, **kw: self._worker.run(attr, *a, **kw)


class Node:
    def __init__(self, purpose: str, pods: dict[str, tuple[str, int]],
                 ct_timeouts=(21600, 60, 60, 10)):
        self.topo = Topology(purpose)
        self.worker = NetnsWorker(self.topo.node)
        self.root = bpffs_root()
        self.raw = Datapath(self.root, ct_timeouts=ct_timeouts, cache_dir=BPF_CACHE)
        self.dp = InNetns(self.raw, self.worker)
        self.eps: dict[str, EndpointInfo] = {}
        self.pods = {}
        self._wanted = pods

    def setup(self) -> Node:
        self.dp.open()
        for ep_id, (name, (ip, identity)) in enumerate(self._wanted.items(), start=1):
            pod = self.topo.add_pod(name, ip)
            self.pods[name] = pod
            ep = EndpointInfo(ep_id, ip, pod["ifindex"], pod["mac"], pod["host_mac"], identity)
            self.eps[name] = ep
            self.dp.attach_endpoint(ep)
        return self

    def close(self) -> None:
        try:
            self.dp.destroy()
        finally:
            self.worker.close()
            self.topo.destroy()


@pytest.fixture
def node():
    made: list[Node] = []

    def make(purpose: str, pods: dict[str, tuple[str, int]], **kw) -> Node:
        n = Node(purpose, pods, **kw)
        made.append(n)  # cleaned up even if setting it up fails half-way
        return n.setup()

    yield make
    for n in made:
        n.close()
        assert not n.root.exists(), "destroy() left pins behind"
