"""Stores for the cluster tests: the embedded store (one SQLite file several "nodes" open)
and a real etcd on free loopback ports."""

from __future__ import annotations

import pytest
from pylium.kvstore.testing import EtcdServer


@pytest.fixture(scope="module")
def etcd_server():
    with EtcdServer() as server:
        yield server
