"""The Consul plugin, driven through the real py-consul client against pylium's Consul HTTP
API emulator (no Consul agent can run here), plus the emulator's own Consul behaviours."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import consul
import consul.aio
import pylium_kvstore_consul
import pytest
from pylium.api.kvstore import KVStoreUnavailable
from pylium.errors import ConfigError
from pylium.kvstore.conformance import KVStoreConformance, run
from pylium.kvstore.testing import free_port
from pylium.plugins import make_plugin_manager
from pylium_kvstore_consul.backend import TXN_OPS, ConsulKVStore, parse_address

from tests.support.consul_emulator import ConsulEmulator, parse_duration

# py-consul 1.8.0 passes aiohttp a deprecated argument on every client it creates
pytestmark = pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def emulator():
    with ConsulEmulator(min_ttl=1) as server:
        yield server


def options(emulator, **extra):
    return {"address": emulator.address, "min_session_ttl": 1, "wait": 2, **extra}


class TestConsulEmulatorConformance(KVStoreConformance):
    watch_history = False

    @pytest.fixture
    def store_factory(self, emulator, tmp_path):
        return lambda: ConsulKVStore(options(emulator), tmp_path)


def test_plugin_registers_the_consul_backend():
    record = make_plugin_manager().select("kvstore", "consul")
    assert record.backend is ConsulKVStore
    assert "emulator" in record.description


def test_the_emulator_is_not_shipped_with_the_plugin():
    """The emulator is a test double: the runtime package must not carry it."""
    package = Path(pylium_kvstore_consul.__file__).parent
    assert importlib.util.find_spec("pylium_kvstore_consul.emulator") is None
    assert not [p for p in package.rglob("*.py") if "class ConsulEmulator" in p.read_text()]


def test_unreachable_consul_is_one_clear_line(tmp_path):
    port = free_port()
    store = ConsulKVStore({"address": f"127.0.0.1:{port}", "timeout": 2}, tmp_path)
    with pytest.raises(KVStoreUnavailable) as err:
        run(store.open())
    assert str(err.value).startswith(f"cannot reach consul at http://127.0.0.1:{port}: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("address, field", [
    ("https://127.0.0.1:8500", "TLS"), ("127.0.0.1:http", "bad port")])
def test_bad_address_is_a_config_error(address, field):
    with pytest.raises(ConfigError, match=field):
        parse_address(address)


def test_sessions_below_consuls_minimum_ttl_are_rounded_up(tmp_path):
    """With Consul's defaults (10 s minimum) a 1 s lease becomes a 10 s session."""
    async def body(server):
        async with ConsulKVStore({"address": server.address}, tmp_path) as kv:
            lease = await kv.grant_lease(1)
            assert lease.ttl == 10
            await kv.revoke_lease(lease)
    with ConsulEmulator() as server:
        run(body(server))


def test_many_keys_go_in_transactions_of_consuls_maximum(emulator, tmp_path):
    """`put_many`/`delete_many` write at most TXN_OPS operations per `/v1/txn` (one index each,
    so a blocking watch answers once per transaction, not per key), and `delete_many` counts
    only the keys asked for even when one is a prefix of another (`n/1` and `n/10`)."""
    async def body():
        async with ConsulKVStore(options(emulator), tmp_path) as kv:
            before = await kv.revision()
            items = [(f"many/n/{i}", b"x") for i in range(150)]
            revision = await kv.put_many(items)
            assert revision - before == -(-150 // TXN_OPS) == 3
            assert len(await kv.list("many/")) == 150
            await kv.put("many/keep/1", b"y")
            before = await kv.revision()
            doomed = ["many/n/1", "many/n/10", "many/n/missing"] + \
                [f"many/n/{i}" for i in range(100, 150)]
            assert await kv.delete_many(doomed) == 52
            assert await kv.revision() - before == -(-len(doomed) // (TXN_OPS // 2)) == 2
            left = {i.key for i in await kv.list("many/n/")}
            assert left == {f"many/n/{i}" for i in range(100)} - {"many/n/1", "many/n/10"}
            assert await kv.delete_many(["many/n/1"]) == 0
            await kv.delete_prefix("many/")
    run(body())


def test_emulator_speaks_consuls_kv_api_to_the_real_client(emulator):
    """The client's own KV calls: cas, acquire/release, recurse, blocking queries."""
    async def body():
        c = consul.aio.Consul(host="127.0.0.1", port=emulator.port, verify=False)
        try:
            assert await c.kv.put("emu/a", b"1", cas=0) is True
            assert await c.kv.put("emu/a", b"2", cas=0) is False
            index, entry = await c.kv.get("emu/a")
            assert entry["Value"] == b"1" and int(index) == entry["ModifyIndex"]
            assert await c.kv.put("emu/a", b"3", cas=entry["ModifyIndex"]) is True
            # a blocking query returns when the index moves past the one it was given
            idx, _ = await c.kv.get("emu/", recurse=True)
            waiter = asyncio.ensure_future(c.kv.get("emu/", recurse=True, index=idx,
                                                    wait="10s"))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await c.kv.put("emu/b", b"x")
            new_idx, items = await asyncio.wait_for(waiter, 5)
            assert int(new_idx) > int(idx) and [i["Key"] for i in items] == ["emu/a", "emu/b"]
            # ...and gives up after `wait` with the same index
            began = time.monotonic()
            same_idx, _ = await c.kv.get("emu/", recurse=True, index=new_idx, wait="300ms")
            assert same_idx == new_idx and time.monotonic() - began >= 0.25
            # locks: one holder at a time; release frees the key; destroy deletes it
            s1 = await c.session.create(behavior="delete", lock_delay=0, ttl=10)
            s2 = await c.session.create(behavior="release", lock_delay=0, ttl=10)
            assert await c.kv.put("emu/lock", b"1", acquire=s1) is True
            assert await c.kv.put("emu/lock", b"2", acquire=s2) is False
            assert await c.kv.put("emu/lock", b"1", release=s1) is True
            assert await c.kv.put("emu/lock", b"2", acquire=s2) is True
            await c.session.destroy(s2)  # behavior release: key stays, unlocked
            _, entry = await c.kv.get("emu/lock")
            assert entry["Value"] == b"2" and "Session" not in entry
            assert await c.kv.put("emu/lock", b"3", acquire=s1) is True
            await c.session.destroy(s1)  # behavior delete: key goes
            assert (await c.kv.get("emu/lock"))[1] is None
            with pytest.raises(consul.NotFound):
                await c.session.renew(s1)
            assert await c.kv.delete("emu/", recurse=True) is True
            assert (await c.kv.get("emu/", recurse=True))[1] is None
        finally:
            await c.close()
    run(body())


def test_emulator_enforces_ttl_and_lock_delay(emulator):
    async def body():
        c = consul.aio.Consul(host="127.0.0.1", port=emulator.port, verify=False)
        try:
            # a session held past 2x its TTL without renewal is invalidated
            session = await c.http.put(
                consul.callback.CB.json(is_id=True), "/v1/session/create",
                data='{"TTL": "2s", "Behavior": "release", "LockDelay": "2s"}')
            assert await c.kv.put("delay/k", b"v", acquire=session) is True
            await asyncio.sleep(2.4)
            assert (await c.kv.get("delay/k"))[1].get("Session") == session  # 1x TTL: held
            deadline = time.monotonic() + 8
            while (await c.kv.get("delay/k"))[1].get("Session"):
                assert time.monotonic() < deadline, "session never expired"
                await asyncio.sleep(0.1)
            # lock-delay: nobody may take the key for 2 s after the holder died
            other = await c.session.create(ttl=10, lock_delay=0)
            assert await c.kv.put("delay/k", b"w", acquire=other) is False
            await c.session.destroy(other)
        finally:
            await c.close()
    run(body())


def test_parse_duration():
    assert parse_duration("1m30s") == 90 and parse_duration("150ms") == 0.15
    assert parse_duration("10") == 10
    with pytest.raises(ValueError):
        parse_duration("ten seconds")
