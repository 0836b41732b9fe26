"""bench_lb's pylium side undoes a half-made set-up: when its constructor fails after the
datapath opened (here: attaching socket LB), its pins and its cgroup are gone, since main()
never gets an object to close."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from pylium.datapath.sock import SocketLB

from ..datapath.netns_helpers import NetnsWorker, Topology

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_lb.py"


def _bench_lb():
    spec = importlib.util.spec_from_file_location("tidy_bench_lb", BENCH)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_failed_constructor_leaves_no_pins_or_cgroup(monkeypatch):
    bench = _bench_lb()
    root = Path(f"/sys/fs/bpf/pylium-test-tidy-{uuid.uuid4().hex[:8]}")
    monkeypatch.setattr(bench, "bpffs_root", lambda: root)

    def refuse(self, cgroup):
        raise OSError("socket LB attach refused (test)")

    monkeypatch.setattr(SocketLB, "attach", refuse)
    cgroup = Path("/sys/fs/cgroup/unified") / f"pylium-benchlb-{os.getpid()}"
    topo = Topology("tidy-benchlb")
    worker = NetnsWorker(topo.node)
    try:
        with pytest.raises(OSError, match="refused"):
            bench.Pylium(topo, worker, {})
        assert not root.exists(), f"pins left behind: {sorted(root.rglob('*'))}"
        assert not cgroup.exists()
    finally:
        worker.close()
        topo.destroy()
        # a regression must not leak into the next test: remove what it left
        if cgroup.exists():
            cgroup.rmdir()
        if root.exists():
            shutil.rmtree(root)
