"""A policy-capable agent without the datapath: the daemon with its embedded KV store and
the identity and policy components, as the agent starts them."""

from __future__ import annotations

import pytest
from pylium.agent.daemon import Daemon
from pylium.config import AgentConfig
from pylium.identity import component as identity_component
from pylium.policy import component as policy_component


async def _start_daemon(state_dir) -> Daemon:
    daemon = Daemon(AgentConfig(node_name="n1", state_dir=state_dir))
    record = daemon.plugins.select("kvstore", "embedded")
    daemon.kvstore = record.backend({}, state_dir / "kvstore")
    await daemon.kvstore.open()
    daemon.components["identity"] = await identity_component.start(daemon)
    daemon.components["policy"] = await policy_component.start(daemon)
    return daemon


@pytest.fixture
def start_daemon():
    return _start_daemon
