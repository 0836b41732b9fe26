"""The `kafka` backend. Registered now; its behaviour lands with the l7_kafka issue."""

from pylium.api import L7Parser
from pylium.errors import NotImplementedYet


class L7Kafka(L7Parser):
    name = "kafka"

    def __init__(self, *args, **kwargs):
        raise NotImplementedYet("l7parser backend 'kafka'", "the l7_kafka issue")
