"""The plugin framework: record validation, discovery through entry points, conflicts,
broken plugins, selection by name and hook-call tracing."""

from __future__ import annotations

import logging

import pytest
from pylium.api import KVStore, KVStoreRecord, L7ParserRecord, RoutingMode, RoutingModeRecord
from pylium.errors import PluginError
from pylium.plugins import make_plugin_manager

GOOD_KV = """
    from pylium.api import KVStoreRecord
    from pylium.hookspecs import hookimpl
    from pylium.kvstore.embedded import EmbeddedKVStore

    class Backend(EmbeddedKVStore):
        pass

    @hookimpl
    def pylium_kvstores():
        return [KVStoreRecord(name="{name}", backend=Backend, description="test")]
"""

REPO_PLUGINS = {
    "overlay_vxlan": ("pylium-overlay-vxlan", "routing", "vxlan"),
    "overlay_geneve": ("pylium-overlay-geneve", "routing", "geneve"),
    "native_routing": ("pylium-native-routing", "routing", "native"),
    "kvstore_etcd": ("pylium-kvstore-etcd", "kvstore", "etcd"),
    "kvstore_consul": ("pylium-kvstore-consul", "kvstore", "consul"),
    "l7_http": ("pylium-l7-http", "l7", "http"),
    "l7_kafka": ("pylium-l7-kafka", "l7", "kafka"),
    "encryption_wireguard": ("pylium-encryption-wireguard", "encryption", "wireguard"),
}


# records ---------------------------------------------------------------------------------
class _Routing(RoutingMode):
    def setup_node(self, local): ...
    def node_joined(self, node): ...
    def node_left(self, node): ...
    def teardown(self): ...


@pytest.mark.parametrize("name", ["Bad", "has space", "1starts-with-digit", "", "x" * 64, "dot.ted"])
def test_record_refuses_bad_capability_name(name):
    with pytest.raises(ValueError, match="invalid capability name"):
        RoutingModeRecord(name=name, backend=_Routing)


def test_record_refuses_backend_of_the_wrong_base():
    with pytest.raises(TypeError, match=r"backend must be a subclass of pylium\.api\.kvstore\.KVStore"):
        KVStoreRecord(name="mine", backend=_Routing)
    with pytest.raises(TypeError, match="backend must be a subclass"):
        L7ParserRecord(name="mine", backend=object())


def test_record_refuses_bad_defines_and_keeps_bpf_sources_as_paths():
    with pytest.raises(ValueError, match="invalid -D define name 'lower'"):
        RoutingModeRecord(name="ok", backend=_Routing, defines={"lower": 1})
    with pytest.raises(ValueError, match="must be a string or int"):
        RoutingModeRecord(name="ok", backend=_Routing, defines={"ENABLE_X": 1.5})
    record = RoutingModeRecord(name="ok", backend=_Routing, bpf_sources=["a/b.c"],
                               defines={"ENABLE_X": 1})
    assert str(record.bpf_sources[0]) == "a/b.c"
    with pytest.raises(AttributeError):
        record.name = "other"  # frozen


# discovery -------------------------------------------------------------------------------
def test_every_repo_plugin_registers_from_its_own_distribution():
    manager = make_plugin_manager()
    by_name = {info.name: info for info in manager.infos}
    for entry, (dist, kind, capability) in REPO_PLUGINS.items():
        assert by_name[entry].dist == dist
        assert not by_name[entry].builtin
        record, info = manager.capabilities(kind)[capability]
        assert info.dist == dist
        assert issubclass(record.backend, record.base)
    assert by_name["pylium.builtins"].builtin
    assert set(manager.capabilities("kvstore")) >= {"embedded", "etcd", "consul"}
    assert not manager.broken


def test_third_party_entry_point_is_discovered_and_selectable(fake_site):
    entry = fake_site.add("acme-kv", GOOD_KV.format(name="acme"), version="2.3")
    manager = make_plugin_manager()
    info = next(i for i in manager.infos if i.name == entry)
    assert (info.dist, info.version, info.hooks) == ("acme-kv", "2.3", ("pylium_kvstores",))
    assert manager.select("kvstore", "acme").backend.__module__ == entry


def test_capability_conflict_names_both_distributions(fake_site):
    fake_site.add("acme-kv", GOOD_KV.format(name="shared"))
    fake_site.add("globex-kv", GOOD_KV.format(name="shared"))
    with pytest.raises(PluginError) as err:
        make_plugin_manager()
    message = str(err.value)
    assert "'shared'" in message and "acme-kv" in message and "globex-kv" in message
    assert "\n" not in message


def test_capability_conflict_with_a_repo_plugin(fake_site):
    fake_site.add("acme-kv", GOOD_KV.format(name="etcd"))
    with pytest.raises(PluginError, match="pylium-kvstore-etcd.*acme-kv|acme-kv.*pylium-kvstore-etcd"):
        make_plugin_manager()


def test_entry_point_name_conflict_names_both_distributions(fake_site):
    fake_site.add("acme-kv", GOOD_KV.format(name="one"), entry="samename")
    fake_site.add("globex-kv", GOOD_KV.format(name="two"), entry="samename",
                  module="fakeplug_other")
    with pytest.raises(PluginError, match="'samename' is registered by both (acme|globex)-kv and "
                                          "(globex|acme)-kv"):
        make_plugin_manager()


BROKEN = {
    "import": "raise ImportError('no module named missing_dep')\n",
    "bad hookimpl argument": """
        from pylium.hookspecs import hookimpl

        @hookimpl
        def pylium_kvstores(unknown_argument):
            return []
    """,
    "unknown hook": """
        from pylium.hookspecs import hookimpl

        @hookimpl
        def pylium_kvstore_typo():
            return []
    """,
    "wrong record type": """
        from pylium.api import L7ParserRecord
        from pylium.hookspecs import hookimpl
        from pylium.api import L7Parser

        class P(L7Parser):
            def judge(self, rules, request): ...
            async def start(self, port): ...
            async def stop(self): ...

        @hookimpl
        def pylium_kvstores():
            return [L7ParserRecord(name="oops", backend=P)]
    """,
    "hook raises": """
        from pylium.api import KVStoreRecord
        from pylium.hookspecs import hookimpl

        @hookimpl
        def pylium_kvstores():
            return [KVStoreRecord(name="Bad Name", backend=object)]
    """,
}


@pytest.mark.parametrize("flaw", sorted(BROKEN))
def test_broken_unselected_plugin_is_logged_and_skipped(fake_site, caplog, flaw):
    entry = fake_site.add("acme-broken", BROKEN[flaw])
    fake_site.add("acme-kv", GOOD_KV.format(name="acme"))
    with caplog.at_level(logging.WARNING, logger="pylium.plugins"):
        manager = make_plugin_manager()
    assert [b.name for b in manager.broken] == [entry]
    assert manager.broken[0].dist == "acme-broken"
    assert entry not in {i.name for i in manager.infos}
    assert f"skipping plugin {entry} from acme-broken" in caplog.text
    # the rest keeps working, hooks included
    assert manager.select("kvstore", "acme")
    assert "etcd" in manager.capabilities("kvstore")
    manager.hook.pylium_node_left(node=None)


def test_invalid_entry_point_name_is_skipped(fake_site):
    fake_site.add("acme-kv", GOOD_KV.format(name="acme"), entry="Acme.Plugin")
    manager = make_plugin_manager()
    assert [(b.name, b.dist) for b in manager.broken] == [("Acme.Plugin", "acme-kv")]
    assert "invalid plugin name" in manager.broken[0].error


def test_selecting_a_missing_capability_says_what_is_available(fake_site):
    manager = make_plugin_manager()
    with pytest.raises(PluginError) as err:
        manager.select("kvstore", "redis")
    assert str(err.value).startswith("kvstore 'redis' is selected but not installed "
                                     "(available: consul, embedded, etcd")


def test_selecting_a_broken_plugin_explains_why_in_one_line(fake_site):
    entry = fake_site.add("acme-broken", BROKEN["bad hookimpl argument"])
    manager = make_plugin_manager()
    with pytest.raises(PluginError) as err:
        manager.select("kvstore", "acme")
    message = str(err.value)
    assert f"plugin {entry} (acme-broken) is installed but failed to load" in message
    assert "unknown_argument" in message and "\n" not in message


def test_trace_switch_logs_every_hook_call(monkeypatch, caplog):
    monkeypatch.setenv("PYLIUM_TRACE_PLUGINS", "1")
    manager = make_plugin_manager()
    with caplog.at_level(logging.INFO, logger="pylium.plugins.trace"):
        manager.hook.pylium_l7_parser_for_port(port=80, protocol="TCP")
    assert "hook pylium_l7_parser_for_port(port, protocol)" in caplog.text
    assert "hook pylium_l7_parser_for_port done in" in caplog.text


def test_no_trace_without_the_switch(monkeypatch, caplog):
    monkeypatch.delenv("PYLIUM_TRACE_PLUGINS", raising=False)
    manager = make_plugin_manager()
    with caplog.at_level(logging.DEBUG):
        manager.hook.pylium_l7_parser_for_port(port=80, protocol="TCP")
    assert "hook pylium_l7_parser_for_port" not in caplog.text


def test_kvstore_base_is_abstract():
    with pytest.raises(TypeError):
        KVStore({}, "/tmp")  # type: ignore[abstract]
