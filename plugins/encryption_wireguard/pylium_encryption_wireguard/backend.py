"""The `wireguard` backend: transparent node-to-node encryption of pod traffic.

Each node has a WireGuard device (`device.py`: wireguard-go, this kernel has no WireGuard)
with a private key kept in the plugin's state directory; its public key is what
`setup_node` returns, so the node record the cluster publishes carries it before any other
node can route to this one. Every other node with a published key is a peer: endpoint =
its underlay address and this plugin's UDP port, allowed IPs = its pod CIDR.

Steering is BPF (`bpf/bpf_wireguard.c`), the same in every routing mode: from_container
tail-calls `to_wireguard` for every destination that is not local; a pod of a peer node
goes into the WireGuard device (no tunnel inside, Cilium's `encapsulate: false`), a pod of a
node without a key is dropped and counted (`DROP_UNENCRYPTED`) unless `allow_plaintext`.
Same-node traffic never reaches it. The pod MTU drops by 80 bytes (WireGuard's outer IPv4,
UDP and its own header and tag), on top of the routing mode's tunnel overhead.

Options (`plugin_options.wireguard`):
  `device`           the device name (default `pylium_wg0`, or `wg_<node>_<tag>` when
                     another namespace of this host already has that name)
  `port`             UDP listen port of every node (default 51871, Cilium's)
  `allow_plaintext`  send pod traffic to nodes without a published key in plaintext
                     instead of dropping it (default false; the agent setting
                     `encryption_allow_plaintext: true` does the same)
  `withhold_key`     test hook: do not publish this node's key (as a node that has not
                     set up encryption yet); others then cannot reach its pods"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from pylium.api import Encryption
from pylium.api.node import NodeInfo
from pylium.datapath import netns as plumbing
from pylium.datapath.datapath import ROUTING_SLOT_ENCRYPT
from pylium.datapath.maps.base import BpfMap
from pylium.errors import PyliumError, UserError

from pylium_encryption_wireguard import device, uapi
from pylium_encryption_wireguard.maps import WgNode, WgNodeKey

log = logging.getLogger(__name__)

DEFAULT_PORT = 51871  # Cilium's
#: outer IPv4 20 + UDP 8 + WireGuard data header 16 + Poly1305 tag 16 + padding room 20:
#: the 80 bytes wg-quick and Cilium subtract for IPv6-capable underlays
WIREGUARD_OVERHEAD = 80
KEY_FILE = "private.key"
DEVICE_FILE = "device"
#: after a restart, peers the device still has but no node event confirmed by then are
#: nodes that left while the agent was down
STALE_PEER_GRACE_S = 60.0
OPTIONS = {"device", "port", "allow_plaintext", "withhold_key"}


def _bool_option(options: dict[str, Any], key: str) -> bool:
    value = options.get(key, False)
    if not isinstance(value, bool):
        raise UserError(f"plugin_options.wireguard.{key}: {value!r} is not true or false")
    return value


class EncryptionWireguard(Encryption):
    name = "wireguard"
    mtu_overhead = WIREGUARD_OVERHEAD

    def __init__(self, context, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        unknown = set(self.options) - OPTIONS
        if unknown:
            raise UserError(f"plugin_options.wireguard: unknown option(s) "
                            f"{', '.join(sorted(unknown))} (known: {', '.join(sorted(OPTIONS))})")
        port = self.options.get("port", DEFAULT_PORT)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise UserError(f"plugin_options.wireguard.port: {port!r} is not a port")
        self.port = port
        wanted = self.options.get("device", device.DEFAULT_DEVICE)
        if not isinstance(wanted, str) or not 1 <= len(wanted) <= device.IFNAMSIZ \
                or "/" in wanted or wanted.strip() != wanted:
            raise UserError(f"plugin_options.wireguard.device: {wanted!r} is not an "
                            "interface name (1-15 characters)")
        self.wanted_device = wanted
        # the agent's `encryption_allow_plaintext`, or this plugin's own option
        self.allow_plaintext = (bool(getattr(context, "allow_plaintext", False))
                                or _bool_option(self.options, "allow_plaintext"))
        self.withhold_key = _bool_option(self.options, "withhold_key")
        if context.state_dir is None:
            raise UserError("encryption wireguard needs a state directory for its key")
        self.state_dir = Path(context.state_dir)
        self.device = ""
        self.public_key = ""
        self.local: NodeInfo | None = None
        #: remote nodes as last told (by name)
        self.nodes: dict[str, NodeInfo] = {}
        self.nodes_map: BpfMap | None = None
        self._lock = threading.RLock()
        self._prune: threading.Timer | None = None

    # setup ---------------------------------------------------------------------------------
    def setup_node(self, local: NodeInfo) -> str:
        datapath = self.context.datapath
        if datapath is None:
            raise UserError("encryption wireguard needs the datapath component")
        self.local = local
        private = device.load_or_create_key(self.state_dir / KEY_FILE)
        remembered_file = self.state_dir / DEVICE_FILE
        remembered = remembered_file.read_text().strip() if remembered_file.exists() else ""
        name = device.choose_name(self.wanted_device, local.name, remembered,
                                  explicit="device" in self.options)
        remembered_file.write_text(name + "\n")
        self.device = name
        adopted = device.running(name)
        if not adopted:
            device.start(name, self.state_dir / "wireguard-go.log")
        plumbing.write_sysctl(None, f"net.ipv6.conf.{name}.disable_ipv6", "1")
        plumbing.set_link_mtu(name, self.context.underlay_mtu - WIREGUARD_OVERHEAD)
        plumbing.set_link_up(name)
        # only what differs: re-setting the port rebinds the socket (a restart would drop
        # packets in flight)
        current = uapi.get(name)
        changes = []
        if current.get("private_key") != private:
            changes.append(f"private_key={uapi.b64_to_hex(private)}")
        if current.get("listen_port") != self.port:
            changes.append(f"listen_port={self.port}")
        if changes:
            uapi.set_(name, changes)
        self.public_key = device.public_key(private)
        bpf = self.context.load_bpf(WG_IFINDEX=plumbing.link_info(name).ifindex,
                                    ALLOW_PLAINTEXT=int(self.allow_plaintext))
        self.nodes_map = BpfMap(bpf.map("wg_nodes"), "wg_nodes", WgNodeKey, WgNode,
                                owned=False)
        stale = self._seed_from_device() if adopted else []
        # only now, with the peers the device already has in the map: the previous run's
        # program kept steering until this moment, so a restart sends nothing in plaintext
        datapath.set_routing_slot(ROUTING_SLOT_ENCRYPT, bpf.program("to_wireguard"))
        if stale:
            self._prune = threading.Timer(STALE_PEER_GRACE_S, self._prune_stale, (stale,))
            self._prune.daemon = True
            self._prune.start()
        log.info("wireguard: %s %s (UDP %d, public key %s, mtu %d)",
                 "adopted" if adopted else "created", name, self.port, self.public_key,
                 self.context.underlay_mtu - WIREGUARD_OVERHEAD)
        return "" if self.withhold_key else self.public_key

    def _seed_from_device(self) -> list[str]:
        """A restarted agent: the map gets the peers the device still has, so traffic to
        them keeps flowing until node events arrive; returns their public keys."""
        keys = []
        for peer in uapi.get(self.device)["peers"]:
            node_ip = peer["endpoint"].rsplit(":", 1)[0]
            for cidr in peer["allowed_ips"]:
                if node_ip:
                    self.nodes_map.update(WgNodeKey.of(cidr), WgNode.of(node_ip, True))
            keys.append(peer["public_key"])
        return keys

    def _prune_stale(self, keys: list[str]) -> None:
        with self._lock:
            confirmed = {n.encryption_key for n in self.nodes.values()}
            for key in keys:
                if key in confirmed:
                    continue
                peer = self._device_peer(key)
                log.info("wireguard: removing peer %s (no node announced it since restart)", key)
                try:
                    uapi.set_(self.device, uapi.remove_peer_lines(key))
                except PyliumError as exc:
                    log.warning("wireguard: removing stale peer %s: %s", key, exc)
                    continue
                for cidr in (peer or {}).get("allowed_ips", []):
                    if not any(str(n.pod_cidr) == cidr for n in self.nodes.values()):
                        self.nodes_map.delete(WgNodeKey.of(cidr))

    def _device_peer(self, key: str) -> dict[str, Any] | None:
        for peer in uapi.get(self.device)["peers"]:
            if peer["public_key"] == key:
                return peer
        return None

    # nodes ---------------------------------------------------------------------------------
    def node_joined(self, node: NodeInfo) -> None:
        if self.local is not None and node.name == self.local.name:
            return
        if self.local is not None and node.pod_cidr.overlaps(self.local.pod_cidr):
            raise UserError(f"node {node.name}: pod CIDR {node.pod_cidr} overlaps this "
                            f"node's {self.local.pod_cidr}")
        key = node.encryption_key
        if key:
            uapi.b64_to_hex(key)  # a malformed key in a record: an error for this node
        with self._lock:
            old = self.nodes.get(node.name)
            if old is not None and old.encryption_key and old.encryption_key != key:
                uapi.set_(self.device, uapi.remove_peer_lines(old.encryption_key))
            if old is not None and old.pod_cidr != node.pod_cidr:
                self.nodes_map.delete(WgNodeKey.of(str(old.pod_cidr)))
            if key:
                uapi.set_(self.device, uapi.peer_lines(key, f"{node.ipv4}:{self.port}",
                                                       [str(node.pod_cidr)]))
            self.nodes_map.update(WgNodeKey.of(str(node.pod_cidr)),
                                  WgNode.of(str(node.ipv4), bool(key)))
            self.nodes[node.name] = node
        if not key:
            log.warning("wireguard: node %s published no key: its pods are %s", node.name,
                        "reached in plaintext" if self.allow_plaintext else "unreachable")

    def node_left(self, node: NodeInfo) -> None:
        with self._lock:
            known = self.nodes.pop(node.name, None) or node
            if known.encryption_key:
                uapi.set_(self.device, uapi.remove_peer_lines(known.encryption_key))
            if self.nodes_map is not None:
                self.nodes_map.delete(WgNodeKey.of(str(known.pod_cidr)))

    # key rotation --------------------------------------------------------------------------
    def rotate_key(self) -> str:
        """A new key pair: the device uses it at once, the file keeps it; the caller
        publishes the returned public key, and every peer updates on that node event.
        Packets in flight while peers catch up are retransmitted; connections survive."""
        with self._lock:
            private = device.new_private_key()
            uapi.set_(self.device, [f"private_key={uapi.b64_to_hex(private)}"])
            device.write_key(self.state_dir / KEY_FILE, private)
            self.public_key = device.public_key(private)
        log.info("wireguard: rotated key, public key now %s", self.public_key)
        return "" if self.withhold_key else self.public_key

    # deselection and stop ------------------------------------------------------------------
    def teardown(self) -> None:
        """Encryption deselected: nothing is steered into the device, which goes (with its
        wireguard-go). Also on a backend that never set up: the core asks that of a fresh
        one when an agent starts with encryption deselected, and the device a previous run
        left is the one its state directory names. The key stays (selecting encryption
        again keeps this node's public key)."""
        if self.context.datapath is not None:
            self.context.datapath.set_routing_slot(ROUTING_SLOT_ENCRYPT, None)
        remembered_file = self.state_dir / DEVICE_FILE
        name = self.device or (remembered_file.read_text().strip()
                               if remembered_file.exists() else "")
        if name and device.link_exists(name):  # this namespace's only, never another's
            plumbing.delete_link(name)
        remembered_file.unlink(missing_ok=True)
        self.device = ""
        self.nodes.clear()
        self.close()

    def close(self) -> None:
        """Agent stop: wireguard-go and the steering program keep carrying traffic."""
        if self._prune is not None:
            self._prune.cancel()
            self._prune = None
        self.nodes_map = None

    # status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """`cilium-dbg encrypt status`'s content: mode, interface, key, peers with
        handshake age and bytes."""
        now = time.time()
        by_key = {n.encryption_key: n for n in self.nodes.values() if n.encryption_key}
        try:
            config = uapi.get(self.device) if self.device else {"peers": []}
            error = ""
        except PyliumError as exc:
            config, error = {"peers": []}, str(exc)
        peers = []
        for peer in config["peers"]:
            node = by_key.get(peer["public_key"])
            handshake = peer["last_handshake"]
            peers.append({
                "node": node.name if node else "",
                "public_key": peer["public_key"],
                "endpoint": peer["endpoint"],
                "allowed_ips": peer["allowed_ips"],
                "last_handshake": handshake,
                "handshake_age_seconds": round(now - handshake, 1) if handshake else None,
                "rx_bytes": peer["rx_bytes"], "tx_bytes": peer["tx_bytes"]})
        out = {
            "mode": "wireguard",
            "implementation": "userspace (wireguard-go)",
            "interface": self.device,
            "public_key": self.public_key,
            "key_published": not self.withhold_key,
            "port": self.port,
            "mtu": self.context.underlay_mtu - WIREGUARD_OVERHEAD,
            "mtu_overhead": self.mtu_overhead,
            "routing_mode": self.context.routing_mode,
            "tunnel_inside": False,
            "node_encryption": False,
            "allow_plaintext": self.allow_plaintext,
            "peers": sorted(peers, key=lambda p: (p["node"], p["public_key"])),
            "nodes_without_key": sorted(n.name for n in self.nodes.values()
                                        if not n.encryption_key),
        }
        if error:
            out["error"] = error
        return out
