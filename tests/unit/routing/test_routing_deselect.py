"""A routing mode leaves state on the node (devices, programs on the underlay link, node
routes), so the capability lifecycle records it in `capabilities.json` like encryption and
L7 parsers: a mode the config no longer selects is built once more at the next start and
torn down, before the selected one starts; a teardown that fails is logged, kept on record
and tried again at the following start. (The backends' teardown on a real node:
tests/privileged/routing/test_routing_switch.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import attrs
import pytest
from pylium.agent.capabilities import RAN_FILE, CapabilityLifecycle, RoutingDriver
from pylium.api.records import RoutingModeRecord
from pylium.api.routing import NodeInfo, RoutingMode
from pylium.errors import PluginError

NODE = NodeInfo(name="node1", ipv4="192.168.100.11", pod_cidr="10.200.1.0/24")
#: what the fake backends did, in order: (event, mode, state_dir)
EVENTS: list[tuple[str, str, str]] = []
FAILING: set[str] = set()


class FakeMode(RoutingMode):
    def setup_node(self, local: NodeInfo) -> None:
        EVENTS.append(("setup", self.context.name, str(self.context.state_dir)))

    def node_joined(self, node: NodeInfo) -> None: ...

    def node_left(self, node: NodeInfo) -> None: ...

    def teardown(self) -> None:
        EVENTS.append(("teardown", self.context.name, str(self.context.state_dir)))
        if self.context.name in FAILING:
            raise OSError("device busy")


@attrs.define
class Info:
    dist: str
    version: str = "1.0"
    name: str = "fake"


class Plugins:
    def __init__(self, names: tuple[str, ...]):
        self.records = {n: (RoutingModeRecord(name=n, backend=FakeMode), Info(f"pylium-{n}"))
                        for n in names}

    def select(self, kind: str, name: str) -> RoutingModeRecord:
        if name not in self.records:
            raise PluginError(f"routing mode {name!r} is selected but not installed")
        return self.records[name][0]

    def capabilities(self, kind: str) -> dict[str, Any]:
        return dict(self.records)


@attrs.define
class Config:
    state_dir: Path
    plugin_options: dict = attrs.field(factory=dict)
    kvstore_options: dict = attrs.field(factory=dict)


class Daemon:
    def __init__(self, state_dir: Path, mode: str, installed=("vxlan", "geneve", "native")):
        self.config = Config(state_dir)
        self.mode = mode
        self.plugins = Plugins(installed)
        self.components: dict[str, Any] = {}
        self.metrics = None

    def selected(self) -> dict[str, list[str]]:
        return {"routing": [self.mode]}

    def node_info(self) -> NodeInfo:
        return NODE


class Driver(RoutingDriver):
    """The real driver's record and clean-up; setup without an underlay link or the
    routing component (those are the privileged test's)."""

    def extra_context(self, daemon, record) -> dict[str, Any]:
        return {}

    async def start(self, daemon, running) -> None:
        running.backend.setup_node(NODE)

    async def stop(self, daemon, running) -> None: ...


@pytest.fixture(autouse=True)
def _fresh():
    EVENTS.clear()
    FAILING.clear()


def run_agent(state_dir: Path, mode: str, **kw) -> CapabilityLifecycle:
    """One agent start and stop, selecting `mode`."""
    lifecycle = CapabilityLifecycle(Daemon(state_dir, mode, **kw), {"routing": Driver()})

    async def body():
        await lifecycle.start_kind("routing")
        await lifecycle.stop()

    asyncio.run(body())
    return lifecycle


def ran(state_dir: Path) -> dict:
    return json.loads((state_dir / RAN_FILE).read_text())


def test_the_routing_driver_leaves_state():
    assert RoutingDriver.leaves_state


def test_a_mode_that_ran_is_recorded_and_kept_while_selected(tmp_path):
    run_agent(tmp_path, "vxlan")
    assert ran(tmp_path) == {"routing": ["vxlan"]}
    run_agent(tmp_path, "vxlan")
    assert ran(tmp_path) == {"routing": ["vxlan"]}
    assert [e[0] for e in EVENTS] == ["setup", "setup"]  # a restart is no teardown


def test_switching_modes_tears_the_old_one_down_before_the_new_one_starts(tmp_path):
    run_agent(tmp_path, "vxlan")
    EVENTS.clear()
    run_agent(tmp_path, "geneve")
    state = tmp_path / "plugins"
    assert EVENTS == [("teardown", "vxlan", str(state / "routing-vxlan")),
                      ("setup", "geneve", str(state / "routing-geneve"))]
    assert ran(tmp_path) == {"routing": ["geneve"]}
    EVENTS.clear()
    run_agent(tmp_path, "native")  # and the reverse direction of another pair
    run_agent(tmp_path, "geneve")
    assert [e[:2] for e in EVENTS] == [("teardown", "geneve"), ("setup", "native"),
                                       ("teardown", "native"), ("setup", "geneve")]
    assert ran(tmp_path) == {"routing": ["geneve"]}


def test_a_failed_teardown_is_logged_kept_and_retried_at_the_next_start(tmp_path, caplog):
    run_agent(tmp_path, "vxlan")
    FAILING.add("vxlan")
    with caplog.at_level(logging.ERROR, logger="pylium.agent.capabilities"):
        run_agent(tmp_path, "geneve")
    assert "routing 'vxlan' (pylium-vxlan 1.0) is no longer selected; removing what it " \
        "left on this node failed: device busy" in caplog.text
    assert ("setup", "geneve") in [e[:2] for e in EVENTS]
    assert sorted(ran(tmp_path)["routing"]) == ["geneve", "vxlan"]
    FAILING.clear()
    EVENTS.clear()
    run_agent(tmp_path, "geneve")
    assert [e[:2] for e in EVENTS] == [("teardown", "vxlan"), ("setup", "geneve")]
    assert ran(tmp_path) == {"routing": ["geneve"]}


def test_a_node_upgraded_without_a_record_tears_down_modes_with_a_state_dir(tmp_path):
    (tmp_path / "plugins" / "routing-vxlan").mkdir(parents=True)
    (tmp_path / "plugins" / "encryption-wireguard").mkdir()  # another kind's: not routing's
    run_agent(tmp_path, "native")
    assert [e[:2] for e in EVENTS] == [("teardown", "vxlan"), ("setup", "native")]
    assert ran(tmp_path) == {"routing": ["native"]}


def test_a_mode_uninstalled_since_is_named_and_kept(tmp_path, caplog):
    run_agent(tmp_path, "vxlan")
    with caplog.at_level(logging.WARNING, logger="pylium.agent.capabilities"):
        run_agent(tmp_path, "native", installed=("native",))
    assert "routing 'vxlan' ran on this node before and is no longer selected" in caplog.text
    assert sorted(ran(tmp_path)["routing"]) == ["native", "vxlan"]
