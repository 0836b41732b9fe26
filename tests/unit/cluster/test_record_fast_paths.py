"""The hot-path readers of KV records (every node reads every endpoint's and every node's
record) take shortcuts for the form our own writers produce; each shortcut must accept and
refuse exactly what the general path does, with the same result."""

from __future__ import annotations

import gc
import ipaddress
import json
import random

import pytest
from pylium.api import NodeInfo
from pylium.boundedjson import MAX_DEPTH, DocumentError, load_json
from pylium.cluster import ipcache
from pylium.cluster.ipcache import IP_PREFIX, _decode_entry_json, decode_entry, encode_entry
from pylium.cluster.nodes import _address, _network, decode_node, encode_node
from pylium.documents import RecordError


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except RecordError:
        return ("refused", None)


IPS = ["10.1.2.3", "0.0.0.0", "255.255.255.255", "1.2.3.04", "256.1.1.1", "1.2.3",
       "1.2.3.4.5", " 1.2.3.4", "1.2.3.4\n", "01.2.3.4", "١.2.3.4", "10.0.0.1x", ""]
IDENTITIES = [1, 2000, 0, -1, 0xFFFFFFFF, 0x100000000, 99999999999, True, 1.5, "7", None]
NODES = ["sim1", "", "n\"q", "nöde", "a\\b", "x\ty", "a" * 300]


def _records():
    for identity in IDENTITIES:
        for node_ip in IPS:
            for node in NODES[:3] if node_ip != "10.1.2.3" else NODES:
                yield json.dumps({"endpoint": "ns/pod", "identity": identity, "ip": "10.9.9.9",
                                  "node": node, "node_ip": node_ip}, sort_keys=True).encode()
    good = encode_entry("10.9.9.9", 1234, "sim7", "192.168.1.7", "default/web")
    yield good
    yield good.replace(b", ", b",")  # compact separators: not canonical, still a record
    yield good.replace(b'"identity": 1234', b'"identity": 01234')  # not JSON
    yield good.replace(b'"identity": 1234', b'"identity": 1234.0')
    yield good + b" "
    yield b" " + good
    yield good[:-1] + b', "extra": 1}'
    yield good.replace(b"sim7", "sïm7".encode())
    yield good.replace(b"sim7", b"s\xffm7")  # not UTF-8
    yield good.replace(b"sim7", b"s\\u00efm7")  # an escape
    yield b"[]"
    yield b"{}"
    yield b"x" * (ipcache.MAX_RECORD + 1)
    yield encode_entry("10.9.9.9", 1, "n", "1.1.1.1", "e" * (ipcache.MAX_RECORD + 10))


@pytest.mark.parametrize("key_ip", ["10.9.9.9", "10.9.9.09", "10.9.9", "300.1.1.1"])
def test_ipcache_fast_path_accepts_and_refuses_what_json_does(key_ip):
    key = IP_PREFIX + key_ip
    records = list(_records())
    assert len(records) > 200
    fast_hits = 0
    for raw in records:
        expected = _outcome(_decode_entry_json, key, raw)
        assert _outcome(decode_entry, key, raw) == expected, raw
        if ipcache._CANONICAL(raw) is not None and expected[0] == "ok":
            fast_hits += 1
    if key_ip == "10.9.9.9":
        assert fast_hits > 3  # the shortcut is really taken for our own records


def test_ipcache_fast_path_random_mutations():
    """Random byte edits of a canonical record: both paths always agree."""
    rng = random.Random(16)
    good = encode_entry("10.9.9.9", 1234, "sim7", "192.168.1.7", "default/web")
    key = IP_PREFIX + "10.9.9.9"
    alphabet = b'0123456789."{}:, \\ax\x00\x1f\xc3'
    for _ in range(5000):
        raw = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = alphabet[rng.randrange(len(alphabet))]
        raw = bytes(raw)
        assert _outcome(decode_entry, key, raw) == _outcome(_decode_entry_json, key, raw), raw


@pytest.mark.parametrize("text", ["10.250.0.18", "0.0.0.0", "010.1.1.1", "1.2.3", "256.1.1.1",
                                  "1.2.3.4 ", "::1", "1.2.3.4/32", ""])
def test_node_address_shortcut_is_ipaddress(text):
    def both(value):
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            return "refused"
    assert both(_address(text)) == both(text)


@pytest.mark.parametrize("text", ["10.100.17.0/24", "10.100.17.1/24", "0.0.0.0/0", "1.2.3.4/32",
                                  "10.0.0.0/33", "10.0.0.0/024", "010.0.0.0/8", "10.0.0.0",
                                  "10.0.0.0/255.0.0.0", "10.0.0.0/-1", "10.0.0.0/ 8"])
def test_node_network_shortcut_is_ipaddress(text):
    def both(value):
        try:
            return str(ipaddress.IPv4Network(value))
        except ValueError:
            return "refused"
    assert both(_network(text)) == both(text)


def test_node_record_round_trip_and_refusals():
    node = NodeInfo(name="sim17", ipv4="10.250.0.18", pod_cidr="10.100.17.0/24",
                    labels={"zone": "a"}, encryption_key="k")
    decoded, extra = decode_node(encode_node(node, registered_at=1.5))
    assert decoded == node and extra == {"registered_at": 1.5}
    for bad in (b'{"name": "a", "ipv4": "10.0.0.01", "pod_cidr": "10.0.0.0/24"}',
                b'{"name": "a", "ipv4": "10.0.0.1", "pod_cidr": "10.0.0.1/24"}'):
        with pytest.raises(RecordError):
            decode_node(bad)


@pytest.mark.parametrize("text,ok", [
    ("[" * MAX_DEPTH + "]" * MAX_DEPTH, True),
    ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), False),
    ('{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), False),
    ('{"a": "' + "[" * 100 + '"}', True),  # brackets in a string are no nesting
    ('[' * 40 + '{"a": ' * 30 + "1" + "}" * 30 + "]" * 40, False),
    ("\ufeff{}", False),
    ("[NaN]", False),
])
def test_bounded_json_depth_shortcut(text, ok):
    if ok:
        load_json(text, "x")
    else:
        with pytest.raises(DocumentError):
            load_json(text, "x")


def test_gc_policy_tunes_and_freezes():
    from pylium import gcpolicy

    before = gc.get_threshold()
    try:
        gcpolicy.tune()
        assert gc.get_threshold() == gcpolicy.THRESHOLDS
        kept = [object() for _ in range(10)]
        gcpolicy.settle()
        assert gc.get_freeze_count() > len(kept)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
