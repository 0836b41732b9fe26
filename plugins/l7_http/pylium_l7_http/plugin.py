"""Hook implementations of the `http` plugin."""

from pylium.api import L7ParserRecord
from pylium.hookspecs import hookimpl

from pylium_l7_http.backend import L7Http


@hookimpl
def pylium_l7_parsers():
    return [L7ParserRecord(name="http", backend=L7Http, description="HTTP/1.1 L7 policy proxy (method, path, host, headers)")]
