"""Hook implementations of the `vxlan` plugin."""

from pylium.api import RoutingModeRecord
from pylium.hookspecs import hookimpl

from pylium_overlay_vxlan.backend import (
    BPF_DIR,
    BPF_SOURCE,
    DEFINES,
    RUNTIME_DEFINES,
    OverlayVxlan,
)


@hookimpl
def pylium_routing_modes():
    return [RoutingModeRecord(
        name="vxlan", backend=OverlayVxlan,
        description="VXLAN overlay (collect_md device, VNI = source identity, UDP 8472)",
        bpf_sources=(BPF_DIR / BPF_SOURCE,),
        defines=DEFINES, runtime_defines=RUNTIME_DEFINES)]
