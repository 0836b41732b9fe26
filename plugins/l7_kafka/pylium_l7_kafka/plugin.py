"""Hook implementations of the `kafka` plugin."""

from pylium.api import L7ParserRecord
from pylium.hookspecs import hookimpl

from pylium_l7_kafka.backend import L7Kafka


@hookimpl
def pylium_l7_parsers():
    return [L7ParserRecord(name="kafka", backend=L7Kafka, description="Kafka L7 policy proxy (role, apiKey, topic, clientID)")]
