"""The `geneve` backend. Registered now; its behaviour lands with the routing-modes issue."""

from pylium.api import RoutingMode
from pylium.errors import NotImplementedYet


class OverlayGeneve(RoutingMode):
    name = "geneve"

    def __init__(self, *args, **kwargs):
        raise NotImplementedYet("routingmode backend 'geneve'", "the routing-modes issue")
