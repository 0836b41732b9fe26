"""Hook implementations of the `geneve` plugin."""

from pylium.api import RoutingModeRecord
from pylium.hookspecs import hookimpl

from pylium_overlay_geneve.backend import (
    BPF_DIR,
    BPF_SOURCE,
    DEFINES,
    RUNTIME_DEFINES,
    OverlayGeneve,
)


@hookimpl
def pylium_routing_modes():
    return [RoutingModeRecord(
        name="geneve", backend=OverlayGeneve,
        description="Geneve overlay encapsulated in BPF (VNI = source identity, UDP 6081)",
        bpf_sources=(BPF_DIR / BPF_SOURCE,), defines=DEFINES,
        runtime_defines=RUNTIME_DEFINES)]
