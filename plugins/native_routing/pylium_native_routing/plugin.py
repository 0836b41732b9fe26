"""Hook implementations of the `native` plugin."""

from pylium.api import RoutingModeRecord
from pylium.hookspecs import hookimpl

from pylium_native_routing.backend import NativeRouting


@hookimpl
def pylium_routing_modes():
    return [RoutingModeRecord(
        name="native", backend=NativeRouting,
        description="Native routing: routes to other nodes' pod CIDRs, identity from the "
                    "ipcache")]
