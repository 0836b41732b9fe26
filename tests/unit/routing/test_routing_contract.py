"""Routing-mode contract without root: plugin records and their BPF sources, options,
MTU arithmetic, the tunnel base's per-node bookkeeping and node events from the loop."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading

import pytest
from pylium.agent.node_events import off_loop
from pylium.api.routing import NodeInfo
from pylium.datapath.compile import BASE_FLAGS, bpf_source_dir
from pylium.errors import UserError
from pylium.plugins import make_plugin_manager
from pylium.routing.base import RoutingContext
from pylium.routing.component import Routing
from pylium.routing.tunnel import TUNNEL_OVERHEAD, TunnelRouting
from pylium_native_routing.backend import NativeRouting
from pylium_overlay_geneve.backend import OverlayGeneve
from pylium_overlay_vxlan.backend import OverlayVxlan

LOCAL = NodeInfo(name="node1", ipv4="192.168.100.11", pod_cidr="10.200.1.0/24")
NODE2 = NodeInfo(name="node2", ipv4="192.168.100.12", pod_cidr="10.200.2.0/24")
RUNTIME_DEFINES = {"vxlan": {"VXLAN_IFINDEX": 7, "VXLAN_PORT": 8472, "NODE_IP": "3232261131u"},
                   "geneve": {"NODE_IP": "3232261131u"}}


def ctx(mtu: int = 1500) -> RoutingContext:
    return RoutingContext(datapath=None, node=LOCAL, underlay_ifname="eth0", underlay_mtu=mtu)


def test_every_routing_plugin_is_registered_with_its_bpf_sources():
    pm = make_plugin_manager()
    records = {name: pm.select("routing", name) for name in ("vxlan", "geneve", "native")}
    assert records["vxlan"].backend is OverlayVxlan
    assert records["geneve"].backend is OverlayGeneve
    assert records["native"].backend is NativeRouting
    for name in ("vxlan", "geneve"):
        (source,) = records[name].bpf_sources
        assert source.is_file(), source
    assert records["native"].bpf_sources == ()


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
@pytest.mark.parametrize("name", ["vxlan", "geneve"])
def test_plugin_bpf_compiles_against_the_core_headers(name, tmp_path):
    record = make_plugin_manager().select("routing", name)
    defines = {**record.defines, **RUNTIME_DEFINES[name]}
    (source,) = record.bpf_sources
    proc = subprocess.run(["clang", *BASE_FLAGS, *(f"-D{k}={v}" for k, v in defines.items()),
                           f"-I{bpf_source_dir()}", "-c", str(source), "-o",
                           str(tmp_path / "x.o")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("backend,options,field", [
    (OverlayVxlan, {"port": 0}, "port"),
    (OverlayVxlan, {"port": "8472"}, "port"),
    (OverlayGeneve, {"port": 70000}, "port"),
    (OverlayVxlan, {"mtu": 1400}, "unknown"),
    (OverlayGeneve, {"device": "x"}, "unknown"),
    (NativeRouting, {"port": 1}, "unknown"),
])
def test_bad_plugin_options_are_one_line_user_errors(backend, options, field):
    with pytest.raises(UserError, match=field):
        backend(ctx(), options)


def test_port_defaults_are_ciliums_and_iana():
    assert OverlayVxlan(ctx()).port == 8472
    assert OverlayGeneve(ctx()).port == 6081
    assert OverlayVxlan(ctx(), {"port": 4789}).port == 4789


@pytest.mark.parametrize("backend,overhead", [(OverlayVxlan, 50), (OverlayGeneve, 50),
                                              (NativeRouting, 0)])
def test_pod_mtu_is_underlay_minus_overhead(backend, overhead):
    routing = Routing(backend.name, backend(ctx(9000)), ctx(9000))
    assert routing.pod_mtu == 9000 - overhead
    assert TUNNEL_OVERHEAD == 50


class RecordingTunnel(TunnelRouting):
    name = "fake"
    default_port = 1234

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls: list[tuple[str, str]] = []

    def setup_tunnel(self):
        self.calls.append(("setup", ""))

    def program_node(self, node):
        self.calls.append(("program", f"{node.name}@{node.ipv4}"))

    def unprogram_node(self, node):
        self.calls.append(("unprogram", f"{node.name}@{node.ipv4}"))

    def teardown_tunnel(self):
        self.calls.append(("teardown", ""))


def test_tunnel_base_programs_each_remote_node_once_and_undoes_it():
    t = RecordingTunnel(ctx())
    t.setup_node(LOCAL)
    t.node_joined(LOCAL)  # itself: nothing to do
    t.node_joined(NODE2)
    moved = NodeInfo(name="node2", ipv4="192.168.100.22", pod_cidr="10.200.2.0/24")
    t.node_joined(moved)  # changed address: old state out, new in
    t.node_left(NodeInfo(name="node9", ipv4="192.168.100.19", pod_cidr="10.200.9.0/24"))
    t.teardown()
    assert t.calls == [("setup", ""), ("program", "node2@192.168.100.12"),
                       ("unprogram", "node2@192.168.100.12"), ("program", "node2@192.168.100.22"),
                       ("unprogram", "node2@192.168.100.22"), ("teardown", "")]


def test_a_node_whose_pod_cidr_overlaps_ours_is_refused():
    t = RecordingTunnel(ctx())
    t.setup_node(LOCAL)
    with pytest.raises(UserError, match="overlaps"):
        t.node_joined(NodeInfo(name="evil", ipv4="192.168.100.66", pod_cidr="10.200.0.0/16"))
    assert t.nodes == {}


def test_node_events_from_the_event_loop_run_the_backend_off_the_loop_thread():
    seen = []

    async def main():
        loop_thread = threading.get_ident()
        off_loop(lambda: seen.append(threading.get_ident() != loop_thread))
        with pytest.raises(ValueError):
            off_loop(lambda: (_ for _ in ()).throw(ValueError("boom")))

    asyncio.run(main())
    off_loop(lambda: seen.append("sync"))
    assert seen == [True, "sync"]
