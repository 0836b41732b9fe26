"""Every Python ctypes mirror matches its C struct: sizes and member offsets/names, read
from the BTF of bpf/bpf_alignchecker.c compiled with clang (no root needed)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import pytest
from pylium.datapath.compile import bpf_source_dir, compile_object
from pylium.datapath.maps.conntrack import CtEntry, CtKey
from pylium.datapath.maps.endpoints import EndpointInfoValue, EndpointKey
from pylium.datapath.maps.events import Event
from pylium.datapath.maps.ipcache import IpcacheKey, RemoteEndpointInfo
from pylium.datapath.maps.lb import (
    Lb4AffinityKey,
    Lb4AffinityVal,
    Lb4Backend,
    Lb4Key,
    Lb4ReverseNat,
    Lb4Service,
    Lb4SockKey,
    Lb4SockVal,
)
from pylium.datapath.maps.metrics import MetricsKey, MetricsValue
from pylium.datapath.maps.policy import PolicyMapEntry, PolicyMapKey

MIRRORS = [EndpointKey, EndpointInfoValue, IpcacheKey, RemoteEndpointInfo, PolicyMapKey,
           PolicyMapEntry, CtKey, CtEntry, MetricsKey, MetricsValue, Event, Lb4Key, Lb4Service,
           Lb4Backend, Lb4ReverseNat, Lb4AffinityKey, Lb4AffinityVal, Lb4SockKey, Lb4SockVal]

pytestmark = pytest.mark.skipif(shutil.which("clang") is None or shutil.which("bpftool") is None,
                                reason="needs clang and bpftool")


@pytest.fixture(scope="module")
def btf_structs(tmp_path_factory) -> dict[str, dict]:
    obj = compile_object(bpf_source_dir() / "bpf_alignchecker.c", cache_dir=tmp_path_factory.mktemp("bpfcache"))
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "-j"], check=True,
                         capture_output=True, text=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t["kind"] == "STRUCT"}


def _c_name(mirror: type[ctypes.Structure]) -> str:
    doc = mirror.__doc__ or ""
    assert "`struct " in doc, f"{mirror.__name__} docstring must name its C struct"
    return doc.split("`struct ", 1)[1].split("`", 1)[0]


@pytest.mark.parametrize("mirror", MIRRORS, ids=lambda m: m.__name__)
def test_mirror_matches_c_layout(mirror, btf_structs):
    c_struct = btf_structs[_c_name(mirror)]
    assert ctypes.sizeof(mirror) == c_struct["size"]
    c_members = [(m["name"], m["bits_offset"] // 8) for m in c_struct["members"]]
    py_members = [(name, getattr(mirror, name).offset) for name, *_ in mirror._fields_]
    assert py_members == c_members


def test_event_record_is_the_agreed_64_byte_layout():
    expected = {"ts_ns": 0, "type": 8, "reason": 9, "direction": 10, "flags": 11, "ep_id": 12,
                "proxy_port": 14, "src_identity": 16, "dst_identity": 20, "saddr": 24,
                "daddr": 28, "sport": 32, "dport": 34, "protocol": 36, "tcp_flags": 37,
                "pad": 38, "ifindex": 40, "pkt_len": 44, "pad2": 48, "pad3": 56}
    assert ctypes.sizeof(Event) == 64
    assert {name: getattr(Event, name).offset for name in expected} == expected
