"""A test L7 parser plugin (installed for the agent through a throwaway dist-info on
PYTHONPATH): it runs no proxy itself; its `served_ports()` answers honestly which of its
proxy ports something listens on in the agent's netns right now (/proc/net/tcp), so the
endpoint component loads redirect entries while the test's transparent listener runs and
denies (fail closed) when it does not."""

from __future__ import annotations

from pylium.api import L7Parser, L7ParserRecord, L7Verdict
from pylium.hookspecs import hookimpl

TCP_LISTEN = "0A"


def listening_ports() -> set[int]:
    ports = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


class RedirectTestParser(L7Parser):
    protocol = "http"

    def judge(self, rules, request):
        return L7Verdict(False, "the redirect test parser judges no request")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def served_ports(self) -> set[int]:
        return set(self.context.proxy_ports.values()) & listening_ports()


@hookimpl
def pylium_l7_parsers():
    return [L7ParserRecord(name="redirecttest", backend=RedirectTestParser,
                           description="test: proxy ports served by a test listener")]
