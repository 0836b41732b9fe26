"""The `wireguard` encryption without root: its record and BPF (compiled, map layout checked
against BTF), option errors, the key file, the UAPI text protocol, device naming, and what
`pylium encrypt status` prints."""

from __future__ import annotations

import ctypes
import json
import shutil
import socket
import subprocess
import threading

import pytest
from pylium.api.context import EncryptionContext
from pylium.api.node import NodeInfo
from pylium.cli.cmd_encrypt import status_text
from pylium.datapath.compile import compile_object
from pylium.errors import UserError
from pylium.plugins import make_plugin_manager
from pylium_encryption_wireguard import device, uapi
from pylium_encryption_wireguard.backend import WIREGUARD_OVERHEAD, EncryptionWireguard
from pylium_encryption_wireguard.maps import WgNode, WgNodeKey
from pylium_encryption_wireguard.plugin import BPF_SOURCE, RUNTIME_DEFINES

LOCAL = NodeInfo(name="node1", ipv4="192.168.100.11", pod_cidr="10.200.1.0/24")
HAS_WG = shutil.which("wg") is not None
HAS_CLANG = shutil.which("clang") is not None and shutil.which("bpftool") is not None


def ctx(tmp_path, **options) -> EncryptionContext:
    return EncryptionContext(node=LOCAL, name="wireguard", options=options,
                             state_dir=tmp_path, underlay_ifname="eth0", underlay_mtu=1500,
                             routing_mode="native")


def test_record_is_selectable_and_declares_its_runtime_defines():
    record = make_plugin_manager().select("encryption", "wireguard")
    assert record.backend is EncryptionWireguard
    assert record.bpf_sources == (BPF_SOURCE,)
    assert set(record.runtime_defines) == set(RUNTIME_DEFINES) == {"WG_IFINDEX",
                                                                   "ALLOW_PLAINTEXT"}
    assert EncryptionWireguard.mtu_overhead == WIREGUARD_OVERHEAD == 80


@pytest.mark.skipif(not HAS_CLANG, reason="needs clang and bpftool")
def test_steering_program_compiles_and_its_map_matches_the_mirrors(tmp_path):
    obj = compile_object(BPF_SOURCE, {"WG_IFINDEX": 9, "ALLOW_PLAINTEXT": 0},
                         cache_dir=tmp_path)
    out = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "-j"], check=True,
                         capture_output=True, text=True).stdout
    structs = {t["name"]: t for t in json.loads(out)["types"] if t["kind"] == "STRUCT"}
    for mirror, c_name in ((WgNodeKey, "wg_node_key"), (WgNode, "wg_node")):
        assert f"`struct {c_name}`" in mirror.__doc__
        c_struct = structs[c_name]
        assert ctypes.sizeof(mirror) == c_struct["size"]
        assert [(m["name"], m["bits_offset"] // 8) for m in c_struct["members"]] == [
            (name, getattr(mirror, name).offset) for name, *_ in mirror._fields_]
    with pytest.raises(Exception, match="WG_IFINDEX"):
        compile_object(BPF_SOURCE, {"ALLOW_PLAINTEXT": 0}, cache_dir=tmp_path)


def test_map_values_encode_cidr_and_node():
    key = WgNodeKey.of("10.200.2.0/24")
    assert (key.prefixlen, bytes(key.ip4), key.cidr) == (24, bytes([10, 200, 2, 0]),
                                                        "10.200.2.0/24")
    value = WgNode.of("192.168.100.12", peer=True)
    assert bytes(value.node_ip) == bytes([192, 168, 100, 12]) and value.flags == 1
    assert WgNode.of("192.168.100.12", peer=False).flags == 0


@pytest.mark.parametrize("options, message", [
    ({"port": 0}, "plugin_options.wireguard.port: 0 is not a port"),
    ({"port": "51871"}, "plugin_options.wireguard.port: '51871' is not a port"),
    ({"device": "a-name-far-too-long"}, "plugin_options.wireguard.device"),
    ({"allow_plaintext": "yes"}, "plugin_options.wireguard.allow_plaintext: 'yes' is not"),
    ({"keys": 1}, "plugin_options.wireguard: unknown option(s) keys"),
])
def test_bad_options_are_one_clear_line(tmp_path, options, message):
    with pytest.raises(UserError) as err:
        EncryptionWireguard.from_context(ctx(tmp_path, **options))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_a_datapath_setup_refuses(tmp_path):
    backend = EncryptionWireguard.from_context(ctx(tmp_path))
    with pytest.raises(UserError, match="needs the datapath"):
        backend.setup_node(LOCAL)


@pytest.mark.skipif(not HAS_WG, reason="needs wireguard-tools")
def test_key_file_is_0600_from_creation_and_kept(tmp_path):
    path = tmp_path / "private.key"
    first = device.load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(uapi.b64_to_hex(first)) == 64
    assert device.load_or_create_key(path) == first  # kept across restarts
    public = device.public_key(first)
    assert public != first and len(uapi.b64_to_hex(public)) == 64
    path.chmod(0o644)
    device.load_or_create_key(path)
    assert path.stat().st_mode & 0o777 == 0o600  # a loosened file is tightened again
    path.write_text("not a key\n")
    with pytest.raises(uapi.UapiError, match="not a WireGuard key"):
        device.load_or_create_key(path)  # a damaged key is an error, never replaced


def test_keys_convert_between_base64_and_hex():
    key = "YXOgmPQHcIZp7gbmU25O8qAIwlwqtaOhAlaT6ktkOng="
    assert uapi.hex_to_b64(uapi.b64_to_hex(key)) == key
    for bad in ("", "abc", "YXOgmPQHcIZp7gbmU25O8qAIwlwqtaOhAlaT6ktk"):
        with pytest.raises(uapi.UapiError):
            uapi.b64_to_hex(bad)


class UapiPeer:
    """A unix socket that answers like wireguard-go does (the text protocol only: the
    lab tests drive the real daemon)."""

    def __init__(self, path, answer: str):
        self.requests: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.answer = answer
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:  # a liveness probe: connect, then close
                        break
                    data += chunk
                if not data:
                    continue
                self.requests.append(data.decode())
                conn.sendall(self.answer.encode())


def test_uapi_get_parses_peers_and_set_sends_one_transaction(tmp_path, monkeypatch):
    monkeypatch.setattr(uapi, "SOCKET_DIR", tmp_path)
    priv = "b8767216e7120727ae715ba3387b2bfe39d551901558f255d094fe9dbbb96457"
    peer = "c8eb36362b78494c9c0218b11dbe8feef5a8376255d791c113b52aa09d1ed61e"
    answer = (f"private_key={priv}\nlisten_port=51871\npublic_key={peer}\n"
              "endpoint=192.168.100.12:51871\nlast_handshake_time_sec=100\n"
              "last_handshake_time_nsec=500000000\ntx_bytes=404\nrx_bytes=348\n"
              "allowed_ip=10.200.2.0/24\nerrno=0\n\n")
    server = UapiPeer(tmp_path / "wgtest0.sock", answer)
    config = uapi.get("wgtest0")
    assert config["listen_port"] == 51871
    assert config["private_key"] == uapi.hex_to_b64(priv)
    assert config["peers"] == [{"public_key": uapi.hex_to_b64(peer),
                                "endpoint": "192.168.100.12:51871",
                                "allowed_ips": ["10.200.2.0/24"], "last_handshake": 100.5,
                                "rx_bytes": 348, "tx_bytes": 404}]
    assert uapi.live("wgtest0") and not uapi.live("wgnothere0")
    uapi.set_("wgtest0", uapi.peer_lines(uapi.hex_to_b64(peer), "192.168.100.12:51871",
                                         ["10.200.2.0/24"]))
    assert server.requests[-1] == (f"set=1\npublic_key={peer}\n"
                                   "endpoint=192.168.100.12:51871\nreplace_allowed_ips=true\n"
                                   "allowed_ip=10.200.2.0/24\n\n")
    server.answer = "errno=22\n\n"
    with pytest.raises(uapi.UapiError, match="errno 22"):
        uapi.set_("wgtest0", uapi.remove_peer_lines(uapi.hex_to_b64(peer)))
    with pytest.raises(uapi.UapiError, match="wgnothere0"):
        uapi.get("wgnothere0")
    server.sock.close()


def test_device_name_falls_back_when_another_namespace_has_it(monkeypatch):
    elsewhere = {"pylium_wg0"}
    monkeypatch.setattr(device, "taken_elsewhere", lambda name: name in elsewhere)
    monkeypatch.setattr(device, "link_exists", lambda name: False)
    assert device.choose_name("pylium_wg0", "node1", "", explicit=False) == \
        f"wg_node1_{device.netns_tag()}"
    assert len(device.choose_name("pylium_wg0", "a-very-long-node-name", "",
                                  explicit=False)) <= device.IFNAMSIZ
    with pytest.raises(UserError, match="in use by another network namespace"):
        device.choose_name("pylium_wg0", "node1", "", explicit=True)
    assert device.choose_name("pylium_wg0", "node1", "wg_node1_abcd", explicit=False) == \
        "wg_node1_abcd"  # the name a previous run used is kept
    elsewhere.clear()
    assert device.choose_name("pylium_wg0", "node1", "", explicit=False) == "pylium_wg0"


def test_status_text_reads_like_cilium_encrypt_status():
    text = status_text({
        "enabled": True, "mode": "wireguard", "implementation": "userspace (wireguard-go)",
        "interface": "pylium_wg0", "public_key": "PUB=", "key_published": True,
        "port": 51871, "mtu": 1420, "mtu_overhead": 80, "allow_plaintext": False,
        "peers": [{"node": "node2", "public_key": "PEER=", "endpoint": "192.168.100.12:51871",
                   "allowed_ips": ["10.200.2.0/24"], "handshake_age_seconds": 7.2,
                   "rx_bytes": 348, "tx_bytes": 404}],
        "nodes_without_key": ["node3"], "errors": {}})
    assert "Encryption: Wireguard (userspace (wireguard-go))" in text
    assert "Interface: pylium_wg0" in text and "Public key: PUB=" in text
    assert "Number of peers: 1" in text and "Peer: node2 PEER=" in text
    assert "Latest handshake: 7s ago" in text and "348 B received, 404 B sent" in text
    assert "Node without key: node3" in text
    assert status_text({"enabled": False, "mode": "disabled"}) == "Encryption: Disabled"
