"""The L7 component's served-ports watch: an agent start regenerates the endpoints once
(the endpoint component's own pass), not a second time a second later because the parser
that just started was not counted yet (issue 15: restarts under load showed every policy
revision bumped twice and a "ports changed" warning on every start)."""

from __future__ import annotations

import asyncio

from pylium.l7.component import L7Proxies


class Backend:
    def __init__(self, ports):
        self.ports = set(ports)

    def served_ports(self):
        return set(self.ports)


class Running:
    def __init__(self, backend):
        self.name, self.backend, self.state = "http", backend, "starting"


class Endpoints:
    def __init__(self):
        self.reasons = []

    async def regenerate_all(self, reason):
        self.reasons.append(reason)


class Daemon:
    def __init__(self):
        self.components = {"endpoint": Endpoints()}

    def spawn(self, coro):
        coro.close()  # the periodic watch: the tests call check_served_ports themselves


def test_a_parser_that_just_started_is_not_a_change():
    daemon = Daemon()
    proxies = L7Proxies(daemon)
    running = Running(Backend({10080, 10081}))
    proxies.add(running)  # called before the lifecycle marks it running
    running.state = "running"
    assert asyncio.run(proxies.check_served_ports()) is False
    assert daemon.components["endpoint"].reasons == []


def test_a_proxy_that_goes_away_or_comes_back_regenerates():
    daemon = Daemon()
    proxies = L7Proxies(daemon)
    backend = Backend({10080})
    running = Running(backend)
    proxies.add(running)
    running.state = "running"
    backend.ports = set()  # the proxy died: redirects must turn into denies
    assert asyncio.run(proxies.check_served_ports()) is True
    backend.ports = {10080}
    assert asyncio.run(proxies.check_served_ports()) is True
    assert daemon.components["endpoint"].reasons == ["L7 proxy ports changed"] * 2


def test_a_failed_parser_serves_nothing():
    daemon = Daemon()
    proxies = L7Proxies(daemon)
    running = Running(Backend({10080}))
    proxies.add(running)
    running.state = "failed"
    assert proxies.proxy_ports == set()
    assert asyncio.run(proxies.check_served_ports()) is True  # 10080 gone: regenerate
