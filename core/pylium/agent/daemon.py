"""The agent: loads config and plugins, opens the KV store, and holds every subsystem.

Subsystems attach themselves in `start()`; each API route module (`routes_*.py`) reads what
it needs from the `Daemon`. Components are optional attributes so one concern can land at a
time without the others knowing."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from typing import Any

from pylium import __version__
from pylium.api import KVStore
from pylium.config import AgentConfig
from pylium.errors import ConfigError, PluginError, PyliumError
from pylium.plugins import PluginManager, make_plugin_manager

log = logging.getLogger(__name__)

#: component start-up modules, started in this order after the KV store opens; each exposes
#: `async def start(daemon) -> component` and stores nothing global
COMPONENT_MODULES: tuple[str, ...] = (
    "pylium.identity.component",
    "pylium.policy.component",
    "pylium.datapath.component",
    "pylium.routing.component",
    "pylium.endpoint.component",
    "pylium.cluster.component",
    "pylium.lb.component",
    "pylium.flow.component",
)


class Daemon:
    def __init__(self, config: AgentConfig, plugins: PluginManager | None = None):
        self.config = config
        self.plugins = plugins or make_plugin_manager()
        self.started_at = time.time()
        self.kvstore: KVStore | None = None
        #: named subsystems ("policy", "endpoints", "datapath", ...) added by later layers
        self.components: dict[str, Any] = {}
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

    async def start(self) -> None:
        self.check_selection()
        try:
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state_dir {self.config.state_dir}: {exc.strerror}") from None
        record = self.plugins.select("kvstore", self.config.kvstore)
        options = self.config.kvstore_options or self.config.plugin_options.get(record.name, {})
        try:
            self.kvstore = record.backend(options, self.config.state_dir / "kvstore")
            await self.kvstore.open()
        except PyliumError:
            raise
        except Exception as exc:  # a plugin bug: one line naming the plugin, not a traceback
            log.debug("kvstore %s failed to open", record.name, exc_info=True)
            raise PluginError(f"kvstore {record.name!r} failed to open: "
                              f"{type(exc).__name__}: {exc}") from exc
        for module_name in COMPONENT_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                continue  # that layer has not landed in this build
            component = await module.start(self)
            if component is not None:
                self.components[module_name.split(".")[1]] = component
        log.info("agent %s started on node %s (kvstore %s, routing %s)", __version__,
                 self.config.node_name, self.config.kvstore, self.config.routing_mode)

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        return task

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for name, component in reversed(list(self.components.items())):
            close = getattr(component, "close", None)
            if close is not None:
                try:
                    result = close()
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    log.exception("closing %s failed", name)
        if self.kvstore is not None:
            await self.kvstore.close()

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
            "components": sorted(self.components),
            "healthy": bool(kv.get("healthy")),
        }
