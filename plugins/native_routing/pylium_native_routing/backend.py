"""The `native` backend. Registered now; its behaviour lands with the routing-modes issue."""

from pylium.api import RoutingMode
from pylium.errors import NotImplementedYet


class NativeRouting(RoutingMode):
    name = "native"

    def __init__(self, *args, **kwargs):
        raise NotImplementedYet("routingmode backend 'native'", "the routing-modes issue")
