"""Map pressure comes from the datapath (the only part that speaks to libbpf) and reaches
the Prometheus endpoint as Cilium's cilium_bpf_map_pressure does."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from pylium.datapath import Datapath, libbpf
from pylium.flow.component import FlowObserver
from pylium.flow.metrics import make_registry

from .netns_helpers import bpffs_root

BPF_CACHE = Path("/tmp/pylium-test-bpf-cache")


@pytest.fixture
def datapath():
    dp = Datapath(bpffs_root(), cache_dir=BPF_CACHE).open()
    try:
        yield dp
    finally:
        dp.destroy()


def test_map_pressure_counts_entries_against_max_entries(datapath):
    for i in range(3):
        datapath.upsert_ipcache(f"10.77.0.{i}/32", 1000 + i)
    ipcache_max = libbpf.map_info(datapath.ipcache.fd).max_entries
    pressure = datapath.map_pressure()
    assert set(pressure) == {"endpoints", "ipcache", "conntrack", "policy"}
    assert pressure["ipcache"] == pytest.approx(3 / ipcache_max)
    assert pressure["endpoints"] == 0.0


def test_metrics_endpoint_reports_the_datapath_map_pressure(datapath):
    datapath.upsert_ipcache("10.77.1.0/24", 1234)
    observer = FlowObserver("pressure-node")
    observer.daemon = SimpleNamespace(components={"datapath": datapath}, started_at=time.time(),
                                      config=None)
    registry, collector = make_registry(observer)
    text = generate_latest(registry).decode()
    expected = 1 / libbpf.map_info(datapath.ipcache.fd).max_entries
    line = next(ln for ln in text.splitlines()
                if ln.startswith('pylium_bpf_map_pressure{map_name="ipcache"}'))
    assert float(line.split()[-1]) == pytest.approx(expected)
