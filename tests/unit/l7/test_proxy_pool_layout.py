"""`ProxyPool`'s layout without processes: which state directories its workers use, which
proxies it treats as strays to stop, and refusing a pool of no workers."""

from __future__ import annotations

import pytest
from pylium.errors import PluginError
from pylium.l7.supervisor import ProxyPool


def pool(tmp_path, workers: int) -> ProxyPool:
    return ProxyPool(tmp_path, "m:F", {"ingress": 10080}, "v", workers=workers,
                     on_flow=lambda _m: None)


def test_one_worker_is_the_plain_proxy_and_every_pool_worker_a_stray(tmp_path):
    for i in range(3):
        (tmp_path / f"worker-{i}").mkdir()
    one = pool(tmp_path, 1)
    assert [m.state_dir for m in one.members] == [tmp_path]
    assert not one.members[0].reuseport
    assert one._strays() == [tmp_path / f"worker-{i}" for i in range(3)]


def test_a_pool_reuses_its_ports_and_stops_the_single_proxy_and_extra_workers(tmp_path):
    for name in ("worker-0", "worker-1", "worker-2", "worker-x"):
        (tmp_path / name).mkdir()
    two = pool(tmp_path, 2)
    assert [m.state_dir for m in two.members] == [tmp_path / "worker-0",
                                                   tmp_path / "worker-1"]
    assert all(m.reuseport for m in two.members)
    assert two._strays() == [tmp_path, tmp_path / "worker-2", tmp_path / "worker-x"]


def test_no_workers_is_refused(tmp_path):
    with pytest.raises(PluginError, match="at least 1"):
        pool(tmp_path, 0)


def test_unhealthy_pool_serves_no_port(tmp_path):
    # nothing spawned: no worker is healthy, so no port counts as served (fail closed)
    assert pool(tmp_path, 2).served_ports() == set()
