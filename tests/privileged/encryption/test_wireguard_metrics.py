"""The forwarded counter counts what leaves: a pod packet that the WireGuard steering
program drops as unencrypted (DROP_UNENCRYPTED) is counted dropped and not forwarded,
although from_container counted it forwarded before its tail call; a packet the program
sends into the WireGuard device stays counted forwarded. Real pings from a pod netns through
the programs on its veth; a veth (this kernel has no dummy links) stands in for
wireguard-go's device (only its ifindex matters to the program)."""

from __future__ import annotations

from pathlib import Path

import pylium_encryption_wireguard
from pylium.datapath.datapath import ROUTING_SLOT_ENCRYPT
from pylium.datapath.maps.base import BpfMap
from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey
from pylium_encryption_wireguard.maps import WgNode, WgNodeKey

from ..datapath.conftest import node  # noqa: F401  (the datapath tests' node fixture)
from ..datapath.netns_helpers import in_ns, link_info

SOURCE = Path(pylium_encryption_wireguard.__file__).parent / "bpf" / "bpf_wireguard.c"
DROP_UNENCRYPTED = 220
PODS = {"a": ("10.219.1.10", 4101)}
NO_KEY_POD = "10.219.9.1"   # a pod of a node without a key (behind a tunnel endpoint)
PEER_POD = "10.219.8.1"     # a pod of a WireGuard peer node


def _counts(n) -> tuple[int, int, int]:
    rows = {(m["reason"], m["direction"]): m for m in n.dp.dump_metrics()}
    forwarded = rows.get((0, "egress"), {"packets": 0, "bytes": 0})
    dropped = rows.get((DROP_UNENCRYPTED, "egress"), {"packets": 0})
    return forwarded["packets"], forwarded["bytes"], dropped["packets"]


def _ping(n, dst: str, count: int) -> None:
    in_ns(n.pods["a"]["ns"], "ping", "-c", str(count), "-W", "1", "-i", "0.2", "-s", "56",
          dst, check=False)


def test_unencrypted_drop_is_not_counted_forwarded(node):  # noqa: F811
    n = node("tidy-wgmet", PODS)
    n.dp.update_policy(1, EndpointPolicy(True, True, {
        PolicyKey(0, Direction.INGRESS): PolicyEntry(),
        PolicyKey(0, Direction.EGRESS): PolicyEntry()}, 1))
    in_ns(n.topo.node, "ip", "link", "add", "wgtidy0", "type", "veth", "peer", "wgtidy1")
    for link in ("wgtidy0", "wgtidy1"):
        in_ns(n.topo.node, "ip", "link", "set", link, "up")
    wg_ifindex, _mac = link_info(n.topo.node, "wgtidy0")
    obj = n.dp.load_object(SOURCE, {"WG_IFINDEX": wg_ifindex, "ALLOW_PLAINTEXT": 0})
    try:
        nodes = BpfMap(obj.map("wg_nodes"), "wg_nodes", WgNodeKey, WgNode, owned=False)
        nodes.update(WgNodeKey.of("10.219.8.0/24"), WgNode.of("192.0.2.8", True))
        n.dp.upsert_ipcache("10.219.9.0/24", 5000, tunnel_endpoint="192.0.2.9")
        n.dp.upsert_ipcache("10.219.8.0/24", 5001, tunnel_endpoint="192.0.2.8")
        n.dp.set_routing_slot(ROUTING_SLOT_ENCRYPT, obj.program("to_wireguard"))

        fwd0, bytes0, drop0 = _counts(n)
        _ping(n, NO_KEY_POD, 3)
        fwd1, bytes1, drop1 = _counts(n)
        assert drop1 - drop0 == 3, "every ping dropped as unencrypted"
        assert (fwd1, bytes1) == (fwd0, bytes0), "a dropped packet was counted forwarded"

        _ping(n, PEER_POD, 2)
        fwd2, bytes2, drop2 = _counts(n)
        assert fwd2 - fwd1 == 2 and bytes2 - bytes1 == 2 * 98  # into the device: forwarded
        # (98: Ethernet 14 + IPv4 20 + ICMP 8 + 56 bytes of data)
        assert drop2 == drop1
    finally:
        n.dp.set_routing_slot(ROUTING_SLOT_ENCRYPT, None)
        obj.close()
