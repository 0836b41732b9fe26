"""The capability lifecycle: every selected capability is built, started and stopped by the
core, in one place (Neutron ML2's driver managers: initialise in order, stop in reverse, one
error naming the driver).

For each kind a small driver knows three things: the context its backends get (see
`pylium.api.context`), how to start one, and how to stop one. Everything else is shared:
selection by name, the BPF the record contributes (compiled and loaded by the core before the
backend is built, or on the backend's `context.load_bpf()` when the record declares runtime
defines), one line naming the plugin when a selected backend cannot start, and the state
each capability reports (`running`, `failed: <reason>`, `not selected`).

Some kinds leave state on the node that outlives the agent (a routing mode: its devices,
programs on the underlay link, node routes; encryption: a device and its daemon, a steering
program; an L7 parser: its proxy process). Which of those ran is recorded in the state directory
(`capabilities.json`); when a later start no longer selects one, the core builds its backend
once more, asks it to `teardown()` what it left, and forgets it."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from pylium.api.context import (
    CapabilityContext,
    EncryptionContext,
    KVStoreContext,
    L7Context,
    OrchestratorContext,
    RoutingContext,
)
from pylium.api.node import NodeInfo
from pylium.api.records import Capability
from pylium.errors import NotImplementedYet, PluginError, PyliumError
from pylium.plugins import one_line

log = logging.getLogger(__name__)

RUNNING = "running"
NOT_SELECTED = "not selected"
STOPPED = "stopped"
#: in the agent's state_dir: kind -> names of the capabilities that ran and left state
RAN_FILE = "capabilities.json"


class PluginBpfObjects:
    """The loaded objects of one capability's `bpf_sources` (`pylium.api.context.PluginBpf`):
    programs and maps looked up by name across them. Closing drops our fds; programs stay
    wherever the backend attached them."""

    def __init__(self, objects: list[Any]):
        self.objects = objects

    def program(self, name: str) -> int:
        for obj in self.objects:
            if name in obj.prog_fds:
                return obj.prog_fds[name]
        raise PluginError(f"BPF program {name!r} is in none of {self.sources()}")

    def map(self, name: str) -> int:
        for obj in self.objects:
            if name in obj.map_fds:
                return obj.map_fds[name]
        raise PluginError(f"BPF map {name!r} is in none of {self.sources()}")

    def sources(self) -> list[str]:
        return [Path(obj.source).name for obj in self.objects]

    def programs(self) -> list[str]:
        return sorted(name for obj in self.objects for name in obj.prog_fds)

    def close(self) -> None:
        for obj in self.objects:
            obj.close()
        self.objects = []


@attrs.define(eq=False)
class RunningCapability:
    """One selected capability: its record, the plugin that provides it, its backend once
    built, what the core loaded for it, and its state."""

    kind: str
    name: str
    record: Capability
    dist: str
    version: str
    plugin: str
    backend: Any = None
    bpf: PluginBpfObjects | None = None
    state: str = "starting"

    def describe(self) -> dict[str, Any]:
        status = {}
        if self.backend is not None and self.state == RUNNING:
            try:
                result = self.backend.status()
                if inspect.iscoroutine(result):  # a KV store's is async: `kvstore` in status
                    result.close()
                    result = {}
                status = dict(result or {})
            except Exception as exc:  # a plugin's status must not break `pylium status`
                status = {"error": one_line(exc)}
        return {"kind": self.kind, "name": self.name, "dist": self.dist,
                "version": self.version, "plugin": self.plugin, "selected": True,
                "state": self.state,
                "bpf": {"sources": self.bpf.sources(), "programs": self.bpf.programs()}
                if self.bpf is not None else None,
                "status": status}


def plugin_states(daemon) -> Path:
    """Where capabilities keep their state: `<kind>-<name>` directories (`state_dir`)."""
    return Path(daemon.config.state_dir) / "plugins"


class KindDriver:
    """How one capability kind is built, started and stopped. `context()` returns the
    kind's context; `start()` runs after the backend is built; `stop()` at agent stop."""

    kind = ""
    context_type: type[CapabilityContext] = CapabilityContext
    #: a started capability of this kind leaves state on the node after the agent stops,
    #: which `clean_up` removes once the capability is deselected
    leaves_state = False

    def extra_context(self, daemon, record: Capability) -> dict[str, Any]:
        return {}

    def state_dir(self, daemon, record: Capability) -> Path:
        return plugin_states(daemon) / f"{self.kind}-{record.name}"

    async def start(self, daemon, running: RunningCapability) -> None: ...

    async def stop(self, daemon, running: RunningCapability) -> None: ...

    async def clean_up(self, daemon, running: RunningCapability) -> None:
        """A capability of a previous run, deselected since: its freshly built backend
        removes what that run left on the node."""
        await asyncio.to_thread(running.backend.teardown)


class CapabilityLifecycle:
    """`daemon.capabilities`: starts the selected capabilities kind by kind (the daemon says
    when each kind's turn comes) and stops them all in reverse."""

    def __init__(self, daemon, drivers: dict[str, KindDriver] | None = None):
        self.daemon = daemon
        self.drivers = drivers or default_drivers()
        self.started: list[RunningCapability] = []
        self.failed: dict[tuple[str, str], RunningCapability] = {}

    # start --------------------------------------------------------------------------------
    async def start_kind(self, kind: str) -> list[RunningCapability]:
        """Clean up after capabilities of `kind` that ran before and are deselected now, then
        build and start every one the config selects; the first one that cannot start stops
        the agent with a `PluginError` naming its plugin."""
        await self._clean_up_deselected(kind)
        out = []
        for name in self.daemon.selected().get(kind, []):
            out.append(await self._start_one(kind, name))
        return out

    # what ran before ----------------------------------------------------------------------
    def _ran_path(self) -> Path:
        return Path(self.daemon.config.state_dir) / RAN_FILE

    def ran(self) -> dict[str, list[str]]:
        """Kind -> the capabilities that ran on this node and may have left state there."""
        path = self._ran_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return self._ran_before_the_record()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): [str(n) for n in v] for k, v in data.items() if isinstance(v, list)}

    def _ran_before_the_record(self) -> dict[str, list[str]]:
        """No record yet (a node upgraded from a version that kept none): a capability that
        has a state directory has run here (`KindDriver.state_dir`)."""
        plugins = plugin_states(self.daemon)
        found: dict[str, list[str]] = {}
        for kind, driver in self.drivers.items():
            if not driver.leaves_state or not plugins.is_dir():
                continue
            names = sorted(d.name.removeprefix(f"{kind}-") for d in plugins.iterdir()
                           if d.is_dir() and d.name.startswith(f"{kind}-"))
            if names:
                found[kind] = names
        return found

    def _set_ran(self, kind: str, name: str, ran: bool) -> None:
        data = self.ran()
        names = [n for n in data.get(kind, []) if n != name] + ([name] if ran else [])
        path = self._ran_path()
        if names == data.get(kind, []) and path.exists():
            return
        if names:
            data[kind] = names
        else:
            data.pop(kind, None)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)

    async def _clean_up_deselected(self, kind: str) -> None:
        """Tear down what deselected capabilities of `kind` left on the node. A failure is
        logged and the record kept, so the next start tries again; it does not stop this
        one (the core already took their programs off the packet path)."""
        driver = self.drivers[kind]
        if not driver.leaves_state:
            return
        selected = set(self.daemon.selected().get(kind, []))
        for name in [n for n in self.ran().get(kind, []) if n not in selected]:
            try:
                record, dist, version, plugin = self._describe_plugin(kind, name)
            except PyliumError as exc:
                log.warning("%s %r ran on this node before and is no longer selected, but "
                            "cannot clean up what it left: %s", kind, name, one_line(exc))
                continue
            running = RunningCapability(kind, name, record, dist, version, plugin)
            label = f"{kind} {name!r} ({dist} {version})"
            try:
                running.backend = await asyncio.to_thread(self._build, driver, record, running)
                await driver.clean_up(self.daemon, running)
            except Exception as exc:
                log.debug("%s: clean-up failed", label, exc_info=True)
                log.error("%s is no longer selected; removing what it left on this node "
                          "failed: %s", label, one_line(exc))
                continue
            finally:
                self._give_back(running)
            self._set_ran(kind, name, False)
            log.info("%s is no longer selected: removed what it left on this node", label)

    def _describe_plugin(self, kind: str, name: str) -> tuple[Capability, str, str, str]:
        record = self.daemon.plugins.select(kind, name)
        info = self.daemon.plugins.capabilities(kind)[name][1]
        return record, info.dist, info.version, info.name

    async def _start_one(self, kind: str, name: str) -> RunningCapability:
        record, dist, version, plugin = self._describe_plugin(kind, name)
        driver = self.drivers[kind]
        running = RunningCapability(kind, name, record, dist, version, plugin)
        label = f"{record.kind} {name!r} ({dist} {version})"
        try:
            # off the loop: netlink (pyroute2 runs a loop of its own), clang, libbpf
            running.backend = await asyncio.to_thread(self._build, driver, record, running)
            if driver.leaves_state:  # from its first step on, it may leave something behind
                await asyncio.to_thread(self._set_ran, kind, name, True)
            await driver.start(self.daemon, running)
        except NotImplementedYet as exc:
            self._give_back(running)
            raise PluginError(f"{label} is selected but is a placeholder: {exc}") from None
        except PyliumError as exc:
            self._give_back(running)
            raise PluginError(f"{label} failed to start: {one_line(exc)}") from exc
        except Exception as exc:  # a plugin bug: one line naming the plugin, not a traceback
            log.debug("%s failed to start", label, exc_info=True)
            self._give_back(running)
            raise PluginError(f"{label} failed to start: {type(exc).__name__}: "
                              f"{one_line(exc)}") from exc
        running.state = RUNNING
        self.started.append(running)
        log.info("%s %s running (%s %s)", kind, name, dist, version)
        return running

    def _build(self, driver: KindDriver, record: Capability, running: RunningCapability) -> Any:
        return record.backend.from_context(self._context(driver, record, running))

    def _give_back(self, running: RunningCapability) -> None:
        running.state = "failed"
        if running.bpf is not None:
            running.bpf.close()
            running.bpf = None

    def _context(self, driver: KindDriver, record: Capability,
                 running: RunningCapability) -> CapabilityContext:
        daemon = self.daemon
        cfg = daemon.config
        state_dir = driver.state_dir(daemon, record)
        state_dir.mkdir(parents=True, exist_ok=True)
        options = dict(cfg.plugin_options.get(record.name, {}) or {})
        if record.kind == "kvstore" and cfg.kvstore_options:
            options = dict(cfg.kvstore_options)
        bpf = None
        load_bpf = None
        if record.bpf_sources and record.runtime_defines:
            load_bpf = self._bpf_loader(record, running)
        elif record.bpf_sources:
            running.bpf = bpf = self._load_bpf(record, {})
        return driver.context_type(
            name=record.name, node=daemon.node_info(), options=options, state_dir=state_dir,
            log=logging.getLogger(f"pylium.plugin.{record.name}"), bpf=bpf, load_bpf=load_bpf,
            metrics=daemon.metrics, **driver.extra_context(daemon, record))

    def _load_bpf(self, record: Capability, runtime: dict[str, Any]) -> PluginBpfObjects:
        datapath = self.daemon.components.get("datapath")
        if datapath is None:
            raise PluginError(f"{record.kind} {record.name!r} contributes BPF programs, but "
                              "the agent runs without a datapath")
        defines = {**record.defines, **runtime}
        objects = []
        try:
            for source in record.bpf_sources:
                objects.append(datapath.load_object(Path(source), defines))
        except BaseException:
            for obj in objects:
                obj.close()
            raise
        return PluginBpfObjects(objects)

    def _bpf_loader(self, record: Capability,
                    running: RunningCapability) -> Callable[..., PluginBpfObjects]:
        declared = set(record.runtime_defines)

        def load_bpf(**values: Any) -> PluginBpfObjects:
            given = set(values)
            if given != declared:
                raise PluginError(
                    f"{record.kind} {record.name!r}: load_bpf() got defines "
                    f"{sorted(given)}, the record declares {sorted(declared)}")
            if running.bpf is not None:  # a reload (e.g. the device was re-created)
                running.bpf.close()
            running.bpf = self._load_bpf(record, values)
            return running.bpf

        return load_bpf

    # stop ---------------------------------------------------------------------------------
    async def stop(self, kind: str | None = None) -> None:
        """Stop the started capabilities (of `kind`, or all) in reverse start order; one
        failing to stop is logged and the others still stop."""
        for running in reversed(list(self.started)):
            if kind is not None and running.kind != kind:
                continue
            self.started.remove(running)
            try:
                await self.drivers[running.kind].stop(self.daemon, running)
            except Exception:
                log.exception("stopping %s %s failed", running.kind, running.name)
            finally:
                if running.bpf is not None:
                    running.bpf.close()
                    running.bpf = None
                running.state = STOPPED

    # runtime ------------------------------------------------------------------------------
    def running(self, kind: str) -> list[RunningCapability]:
        return [r for r in self.started if r.kind == kind and r.state == RUNNING]

    def backends(self, kind: str) -> list[Any]:
        return [r.backend for r in self.running(kind)]

    def mark_failed(self, running: RunningCapability, reason: str) -> None:
        """A running capability broke (e.g. its proxy died): say so in status."""
        running.state = f"failed: {one_line(reason)}"
        log.error("%s %s failed: %s", running.kind, running.name, reason)

    def mark_running(self, running: RunningCapability) -> None:
        if running.state != RUNNING:
            log.info("%s %s running again", running.kind, running.name)
        running.state = RUNNING

    def report(self) -> list[dict[str, Any]]:
        """Every installed capability: selected ones with their state, the rest
        `not selected` (what `pylium status` and `pylium plugins` show)."""
        rows = []
        started = {(r.kind, r.name): r for r in self.started}
        selected = self.daemon.selected()
        for kind in self.drivers:
            for name, (_record, info) in self.daemon.plugins.capabilities(kind).items():
                running = started.get((kind, name))
                if running is not None:
                    rows.append(running.describe())
                    continue
                is_selected = name in selected.get(kind, [])
                rows.append({"kind": kind, "name": name, "dist": info.dist,
                             "version": info.version, "plugin": info.name,
                             "selected": is_selected,
                             "state": "not started" if is_selected else NOT_SELECTED,
                             "bpf": None, "status": {}})
        return rows

    # node events --------------------------------------------------------------------------
    def node_joined(self, node: NodeInfo, strict: bool = False) -> None:
        """Another node joined: the routing mode, then encryption, then plugins' hooks. A
        backend's error is logged (node events from the KV store) or, `strict`, raised (a
        node put by hand through the API)."""
        self._node_event("node_joined", ("routing", "encryption"), node, strict)
        self.daemon.plugins.hook.pylium_node_joined(node=node)

    def node_left(self, node: NodeInfo, strict: bool = False) -> None:
        self._node_event("node_left", ("encryption", "routing"), node, strict)
        self.daemon.plugins.hook.pylium_node_left(node=node)

    def _node_event(self, method: str, components: tuple[str, ...], node: NodeInfo,
                    strict: bool) -> None:
        for component in components:
            target = self.daemon.components.get(component)
            if target is None:
                continue
            try:
                getattr(target, method)(node)
            except Exception as exc:
                if strict:
                    raise
                log.warning("%s %s(%s) failed: %s", component, method, node.name, exc)


# drivers -----------------------------------------------------------------------------------
class KVStoreDriver(KindDriver):
    kind = "kvstore"
    context_type = KVStoreContext

    def state_dir(self, daemon, record: Capability) -> Path:
        return Path(daemon.config.state_dir) / "kvstore"  # where stores have always lived

    async def start(self, daemon, running: RunningCapability) -> None:
        await running.backend.open()
        daemon.kvstore = running.backend

    async def stop(self, daemon, running: RunningCapability) -> None:
        await running.backend.close()


class RoutingDriver(KindDriver):
    kind = "routing"
    context_type = RoutingContext
    leaves_state = True  # devices, programs on the underlay link and node routes stay

    def extra_context(self, daemon, record: Capability) -> dict[str, Any]:
        from pylium.routing.component import underlay_of

        return {"datapath": daemon.components.get("datapath"),
                **underlay_of(daemon, record.name)}

    async def start(self, daemon, running: RunningCapability) -> None:
        from pylium.routing.component import start_routing

        daemon.components["routing"] = await start_routing(daemon, running)

    async def stop(self, daemon, running: RunningCapability) -> None:
        routing = daemon.components.pop("routing", None)
        if routing is not None:
            routing.close()


class EncryptionDriver(KindDriver):
    kind = "encryption"
    context_type = EncryptionContext
    leaves_state = True  # a device (and its daemon) and the steering program stay

    def extra_context(self, daemon, record: Capability) -> dict[str, Any]:
        from pylium.routing.component import underlay_of

        return {"datapath": daemon.components.get("datapath"),
                "routing_mode": daemon.config.routing_mode,
                "allow_plaintext": daemon.config.encryption_allow_plaintext,
                **underlay_of(daemon, daemon.config.routing_mode)}

    async def start(self, daemon, running: RunningCapability) -> None:
        from pylium.agent.node_events import NodeEvents

        events = NodeEvents("encryption", running.name, running.backend,
                            running.backend.context)
        await events.setup()
        daemon.components["encryption"] = events

    async def stop(self, daemon, running: RunningCapability) -> None:
        events = daemon.components.pop("encryption", None)
        if events is not None:
            events.close()


class L7Driver(KindDriver):
    kind = "l7"
    context_type = L7Context
    leaves_state = True  # a parser's proxy process outlives the agent

    def extra_context(self, daemon, record: Capability) -> dict[str, Any]:
        from pylium.l7.component import l7_context_handles

        return l7_context_handles(daemon, record)

    async def start(self, daemon, running: RunningCapability) -> None:
        from pylium.l7.component import L7Proxies

        proxies = daemon.components.get("l7")
        if proxies is None:
            proxies = daemon.components["l7"] = L7Proxies(daemon)
        await running.backend.start()
        proxies.add(running)

    async def stop(self, daemon, running: RunningCapability) -> None:
        proxies = daemon.components.get("l7")
        if proxies is not None:
            proxies.remove(running)
            if not proxies.parsers:
                daemon.components.pop("l7", None)
        await running.backend.stop()


class OrchestratorDriver(KindDriver):
    kind = "orchestrator"
    context_type = OrchestratorContext

    def extra_context(self, daemon, record: Capability) -> dict[str, Any]:
        return {"endpoints": daemon.components.get("endpoint"),
                "policy": daemon.components.get("policy"),
                "identities": daemon.components.get("identity"),
                "kvstore": daemon.kvstore,
                "services": daemon.components.get("lb"),
                "nodes": getattr(daemon.components.get("cluster"), "nodes", None)}

    async def start(self, daemon, running: RunningCapability) -> None:
        await running.backend.start()
        daemon.components["orchestrator"] = running.backend

    async def stop(self, daemon, running: RunningCapability) -> None:
        daemon.components.pop("orchestrator", None)
        await running.backend.stop()


def default_drivers() -> dict[str, KindDriver]:
    """Kinds in the order `pylium status` lists them."""
    drivers = (KVStoreDriver(), RoutingDriver(), EncryptionDriver(), L7Driver(),
               OrchestratorDriver())
    return {d.kind: d for d in drivers}

