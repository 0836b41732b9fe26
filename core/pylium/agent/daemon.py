"""The agent: loads config and plugins, then starts, in one defined order, the core's
components and the selected capabilities (KV store, routing mode, encryption, L7 parsers,
orchestrator: built and started by `pylium.agent.capabilities`), and stops them in reverse.

Each API route module (`routes_*.py`) reads what it needs from the `Daemon`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry

from pylium import __version__
from pylium.agent.capabilities import CapabilityLifecycle
from pylium.api import KVStore
from pylium.api.node import NodeInfo
from pylium.config import AgentConfig
from pylium.errors import ConfigError
from pylium.plugins import PluginManager, make_plugin_manager

log = logging.getLogger(__name__)

#: start order: a capability kind (started by the capability lifecycle) or a core component
#: module (exposing `async def start(daemon) -> component`). Stop runs in reverse.
START_ORDER: tuple[str, ...] = (
    "kvstore",
    "pylium.identity.component",
    "pylium.policy.component",
    "pylium.datapath.component",
    "routing",
    "encryption",
    "l7",
    "pylium.endpoint.component",
    "pylium.cluster.component",
    "pylium.lb.component",
    "pylium.flow.component",
    "orchestrator",
    "pylium.cni.component",
)


class Daemon:
    def __init__(self, config: AgentConfig, plugins: PluginManager | None = None):
        self.config = config
        self.plugins = plugins or make_plugin_manager()
        self.started_at = time.time()
        self.kvstore: KVStore | None = None
        #: named subsystems ("policy", "endpoint", "datapath", "routing", "l7", ...)
        self.components: dict[str, Any] = {}
        #: every collector the agent serves on its Prometheus endpoint (plugins' too)
        self.metrics = CollectorRegistry(auto_describe=False)
        self.capabilities = CapabilityLifecycle(self)
        self._started: list[str] = []
        self._tasks: list[asyncio.Task] = []

    def selected(self) -> dict[str, list[str]]:
        c = self.config
        return {
            "routing": [c.routing_mode],
            "kvstore": [c.kvstore],
            "orchestrator": [c.orchestrator],
            "l7": list(c.l7_parsers),
            "encryption": [c.encryption] if c.encryption else [],
        }

    def check_selection(self) -> None:
        """Fail fast with one clear line if any selected plugin is missing or broken."""
        for kind, names in self.selected().items():
            for name in names:
                self.plugins.select(kind, name)

    def node_info(self) -> NodeInfo:
        """This node as capability contexts see it (the cluster publishes the same)."""
        from pylium.cluster.component import local_address

        c = self.config
        return NodeInfo(name=c.node_name, ipv4=c.node_ip or local_address(),
                        pod_cidr=c.pod_cidr)

    async def start(self) -> None:
        self.check_selection()
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {self.config.state_dir}: {exc.strerror}") from None
        for step in START_ORDER:
            if step in self.capabilities.drivers:
                await self.capabilities.start_kind(step)
                self._started.append(step)
                continue
            try:
                module = importlib.import_module(step)
            except ModuleNotFoundError as exc:
                if exc.name != step:
                    raise
                continue  # that layer has not landed in this build
            component = await module.start(self)
            if component is not None:
                self.components[step.split(".")[1]] = component
            self._started.append(step)
        log.info("agent %s started on node %s (kvstore %s, routing %s)", __version__,
                 self.config.node_name, self.config.kvstore, self.config.routing_mode)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def stop(self) -> None:
        """Cancel background tasks, then stop what started, in reverse start order:
        capabilities through the lifecycle, components through their `close()`."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for step in reversed(self._started):
            if step in self.capabilities.drivers:
                await self.capabilities.stop(step)
                continue
            name = step.split(".")[1]
            component = self.components.pop(name, None)
            close = getattr(component, "close", None)
            if close is not None:
                try:
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    log.exception("closing %s failed", name)
        self._started.clear()
        await self.capabilities.stop()  # any of a kind whose start failed part-way

    async def status(self) -> dict[str, Any]:
        kv = await self.kvstore.status() if self.kvstore else {"healthy": False}
        cluster = self.components.get("cluster")
        if cluster is not None:
            kv = {**kv, "cluster": cluster.session.state}
        return {
            "version": __version__,
            "node": self.config.node_name,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "kvstore": kv,
            "plugins": self.selected(),
            "capabilities": self.capabilities.report(),
            "components": sorted(self.components),
            "healthy": bool(kv.get("healthy")),
        }
