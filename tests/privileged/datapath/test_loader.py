"""The one BPF loader: a plugin-style object (its own C file outside the core's bpf/,
including the core's headers) loaded through the datapath shares the core's pinned maps;
every program and map is reachable by name; mistakes name the object; a verifier rejection
carries libbpf's log."""

from __future__ import annotations

import ctypes
import secrets
from pathlib import Path

import pytest
from pylium.datapath import Datapath, DatapathError, libbpf
from pylium.datapath.loader import load_object
from pylium.datapath.maps.endpoints import EndpointInfoValue, EndpointKey
from pylium.datapath.packet import SkBuff

from .netns_helpers import bpffs_root

BPF_CACHE = Path("/tmp/pylium-test-bpf-cache")

# reads the endpoints map the core pins: returns the ep_id of 10.9.8.7 (or 0) as its verdict
PLUGIN_C = r"""
#include "lib/common.h"
#include "lib/endpoints.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} plugin_private SEC(".maps");

SEC("tc")
int lookup_ep(struct __sk_buff *skb)
{
	__u32 ip = bpf_htonl(PROBE_IP);
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &ip);

	return ep ? ep->ep_id : 0;
}

SEC("tc")
int always_ok(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
"""

# direct packet access without a bounds check: clang compiles it, the verifier refuses it
REJECTED_C = r"""
#include "lib/common.h"

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int unchecked(struct __sk_buff *skb)
{
	return *(__u32 *)(long)skb->data;
}
"""


@pytest.fixture
def datapath():
    dp = Datapath(bpffs_root(), cache_dir=BPF_CACHE).open()
    try:
        yield dp
    finally:
        dp.destroy()


@pytest.fixture
def plugin_source(tmp_path) -> Path:
    src = tmp_path / "plugin" / "bpf_probe.c"
    src.parent.mkdir()
    src.write_text(PLUGIN_C)
    return src


def _map_id(fd: int) -> int:
    return libbpf.map_info(fd).id


def test_plugin_object_shares_the_core_maps(datapath, plugin_source):
    with datapath.load_object(plugin_source, {"PROBE_IP": "0x0a090807"}) as obj:
        assert set(obj.prog_fds) == {"lookup_ep", "always_ok"}
        assert {"endpoints", "plugin_private"} <= set(obj.map_fds)
        assert _map_id(obj.map("endpoints")) == _map_id(datapath.endpoints.fd)
        assert _map_id(obj.map("plugin_private")) != _map_id(datapath.endpoints.fd)
        assert obj.object_path.is_file() and obj.source == plugin_source
        # what the core writes, the plugin's program reads
        datapath.endpoints.update(EndpointKey.of("10.9.8.7"), EndpointInfoValue(
            5, 321, 0, 1000, (ctypes.c_uint8 * 6)(), (ctypes.c_uint8 * 6)()))
        retval, _ns, _out, _ctx = libbpf.test_run(obj.program("lookup_ep"), bytes(64),
                                                   SkBuff(ifindex=1))
        assert retval == 321
    assert obj.prog_fds == {} and obj.map_fds == {}
    obj.close()  # idempotent
    with pytest.raises(DatapathError, match="lookup_ep of bpf_probe.c: the object is closed"):
        obj.program("lookup_ep")
    # the shared map outlives the plugin's object
    assert datapath.endpoints.lookup(EndpointKey.of("10.9.8.7")).ep_id == 321


def test_core_object_exposes_every_program_and_map(datapath):
    from pylium.datapath.datapath import PROGRAMS

    assert set(datapath.prog_fds) == set(PROGRAMS) >= {"from_container", "to_container",
                                                        "from_netdev"}
    assert datapath.object_path is not None and datapath.object_path.is_file()
    assert {"endpoints", "ipcache", "policy", "conntrack"} <= set(datapath._obj.map_fds)


def test_missing_program_or_map_names_the_object(datapath, plugin_source):
    with datapath.load_object(plugin_source, {"PROBE_IP": "1"}) as obj:
        with pytest.raises(DatapathError, match=r"program nope missing from bpf_probe.c "
                                                r"\(it has: always_ok, lookup_ep\)"):
            obj.program("nope")
        with pytest.raises(DatapathError, match="map nope missing from bpf_probe.c"):
            obj.map("nope")


def test_require_pinned_refuses_an_object_without_the_map(plugin_source):
    root = Path(f"/sys/fs/bpf/pylium-test-datapath-loader-{secrets.token_hex(3)}")
    root.mkdir()
    try:
        with pytest.raises(DatapathError, match="map ipcache missing from bpf_probe.c"):
            load_object(plugin_source, {"PROBE_IP": "1"}, pin_root=root, cache_dir=BPF_CACHE,
                        pinned_maps=("endpoints", "ipcache"), require_pinned=True)
        assert list(root.iterdir()) == []  # refused before anything was created
        with load_object(plugin_source, {"PROBE_IP": "1"}, pin_root=root, cache_dir=BPF_CACHE,
                         pinned_maps=("endpoints", "ipcache")):
            assert sorted(p.name for p in root.iterdir()) == ["endpoints"]
    finally:
        for pin in root.iterdir():
            pin.unlink()
        root.rmdir()


def test_pinning_into_a_missing_directory_is_refused(plugin_source, tmp_path):
    with pytest.raises(DatapathError, match="pin directory .*/absent does not exist"):
        load_object(plugin_source, {"PROBE_IP": "1"}, pin_root=tmp_path / "absent",
                    pinned_maps=("endpoints",), cache_dir=BPF_CACHE)


def test_verifier_rejection_carries_the_libbpf_log(tmp_path):
    src = tmp_path / "bpf_rejected.c"
    src.write_text(REJECTED_C)
    with pytest.raises(DatapathError) as exc:
        load_object(src, cache_dir=BPF_CACHE)
    message = str(exc.value)
    assert message.startswith("loading bpf_rejected.c failed (Permission denied)")
    assert "invalid access to packet" in message  # the verifier's own words, via libbpf


def test_datapath_load_object_needs_an_open_datapath(plugin_source):
    with pytest.raises(DatapathError, match="not open"):
        Datapath(bpffs_root(), cache_dir=BPF_CACHE).load_object(plugin_source, {"PROBE_IP": "1"})
