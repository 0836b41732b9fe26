"""The one plugin-manager factory and selection of capabilities by name.

Order: built-in plugins (explicit tuple), then the `pylium` entry-point group, then
`check_pending()`. An installed plugin that fails to load is logged and skipped unless it is
selected; a selected capability that is missing stops start-up with one clear line."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterable
from importlib.metadata import Distribution, entry_points

import attrs
import pluggy

from pylium import hookspecs
from pylium.api.records import CAPABILITY_KINDS, NAME_RE, Capability
from pylium.errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pylium"

#: modules registered before any entry point; they ship inside the core distribution
BUILTIN_PLUGINS: tuple[str, ...] = ("pylium.builtins",)


@attrs.frozen
class PluginInfo:
    """One registered plugin module and the distribution it came from."""

    name: str
    dist: str
    version: str
    hooks: tuple[str, ...]
    builtin: bool


@attrs.frozen
class BrokenPlugin:
    """An entry point that failed to load: kept so a later selection can explain itself."""

    name: str
    dist: str
    error: str


class PluginManager:
    """Wraps a pluggy manager with capability lookup, conflict detection and selection."""

    def __init__(self, pm: pluggy.PluginManager, infos: list[PluginInfo], broken: list[BrokenPlugin]):
        self.pm = pm
        self.infos = infos
        self.broken = broken
        self._capabilities: dict[str, dict[str, tuple[Capability, PluginInfo]]] | None = None

    @property
    def hook(self):
        return self.pm.hook

    def capabilities(self, kind: str) -> dict[str, tuple[Capability, PluginInfo]]:
        """Name -> (record, providing plugin) for one capability kind, sorted by name."""
        if self._capabilities is None:
            self._capabilities = {k: self._collect(k) for k in CAPABILITY_KINDS}
        if kind not in self._capabilities:
            raise PluginError(f"unknown capability kind {kind!r}")
        return self._capabilities[kind]

    def _collect(self, kind: str) -> dict[str, tuple[Capability, PluginInfo]]:
        hook_name, record_type = CAPABILITY_KINDS[kind]
        by_module = {info.name: info for info in self.infos}
        found: dict[str, tuple[Capability, PluginInfo]] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            info = by_module[self.pm.get_name(impl.plugin)]
            for record in _records_of(impl, info, hook_name, record_type):
                if record.name in found:
                    other = found[record.name][1]
                    raise PluginError(
                        f"{record.kind} {record.name!r} is provided by both {other.dist} "
                        f"({other.name}) and {info.dist} ({info.name}); uninstall one"
                    )
                found[record.name] = (record, info)
        return dict(sorted(found.items()))

    def _drop_broken_providers(self) -> None:
        """Call every capability hook once; a plugin whose hook raises or returns a bad
        record is broken: logged, unregistered and remembered (fatal only if a built-in)."""
        for hook_name, record_type in CAPABILITY_KINDS.values():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                name = self.pm.get_name(impl.plugin)
                info = next((i for i in self.infos if i.name == name), None)
                if info is None:  # dropped while checking an earlier hook
                    continue
                try:
                    _records_of(impl, info, hook_name, record_type)
                except PluginError as exc:
                    if info.builtin:
                        raise
                    self._mark_broken(info.name, info.dist, str(exc))

    def _mark_broken(self, name: str, dist: str, error: str) -> None:
        error = one_line(error)
        log.warning("skipping plugin %s from %s: %s", name, dist, error)
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.infos = [i for i in self.infos if i.name != name]
        self.broken.append(BrokenPlugin(name, dist, error))

    def select(self, kind: str, name: str) -> Capability:
        """The capability selected by config, or a `PluginError` saying what to install."""
        available = self.capabilities(kind)
        if name in available:
            return available[name][0]
        record_type = CAPABILITY_KINDS[kind][1]
        hint = ", ".join(available) or "none"
        broken = "".join(
            f"; plugin {b.name} ({b.dist}) is installed but failed to load: {b.error}"
            for b in self.broken
        )
        raise PluginError(
            f"{record_type.kind} {name!r} is selected but not installed "
            f"(available: {hint}){broken}"
        )

    def hooks_of(self, module_name: str) -> tuple[str, ...]:
        plugin = self.pm.get_plugin(module_name)
        return tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))


def one_line(text: str) -> str:
    """Error text from third-party code, squeezed onto one line for logs and messages."""
    return " ".join(str(text).split())


def _records_of(impl, info: PluginInfo, hook_name: str, record_type: type) -> list:
    """Call one capability hookimpl and check what it returns."""
    try:
        records = list(impl.function() or ())
    except Exception as exc:  # a plugin bug must not take the core down
        raise PluginError(
            f"plugin {info.name} ({info.dist}) failed in {hook_name}: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if _tracing():
        _trace_log().info("hook %s in %s (%s) -> %s", hook_name, info.name, info.dist,
                          [getattr(r, "name", r) for r in records])
    for record in records:
        if not isinstance(record, record_type):
            raise PluginError(
                f"plugin {info.name} ({info.dist}) returned {type(record).__name__} "
                f"from {hook_name}; expected {record_type.__name__}"
            )
    return records


def _dist_of(ep) -> Distribution | None:
    return getattr(ep, "dist", None)


def _entry_points() -> Iterable:
    return entry_points(group=ENTRY_POINT_GROUP)


def _tracing() -> bool:
    return os.environ.get("PYLIUM_TRACE_PLUGINS") == "1"


def _trace_log() -> logging.Logger:
    """The trace logger, on even when the rest of logging is quiet (the switch asked for it)."""
    trace = logging.getLogger("pylium.plugins.trace")
    trace.setLevel(logging.DEBUG)
    return trace


def _trace_hook_calls(pm: pluggy.PluginManager) -> None:
    """`PYLIUM_TRACE_PLUGINS=1`: log every hook call, who answered and how long it took."""
    trace = _trace_log()
    started: dict[int, float] = {}

    def before(hook_name, impls, kwargs):
        started[id(kwargs)] = time.perf_counter()
        trace.info("hook %s(%s) -> %s", hook_name, ", ".join(sorted(kwargs)),
                   [impl.plugin_name for impl in impls])

    def after(outcome, hook_name, impls, kwargs):
        ms = (time.perf_counter() - started.pop(id(kwargs), time.perf_counter())) * 1000
        failed = outcome.exception
        trace.info("hook %s %s in %.2f ms", hook_name,
                   f"raised {type(failed).__name__}" if failed else "done", ms)

    pm.add_hookcall_monitoring(before, after)


def _register_entry_points(pm: pluggy.PluginManager, infos: list[PluginInfo],
                           broken: list[BrokenPlugin]) -> None:
    seen: dict[str, str] = {}
    for ep in sorted(_entry_points(), key=lambda e: e.name):
        dist = _dist_of(ep)
        dist_name = dist.metadata["Name"] if dist else "?"
        dist_version = dist.version if dist else "?"
        if not NAME_RE.match(ep.name):
            error = ("invalid plugin name: use lowercase letters, digits, '-' or '_', "
                     "starting with a letter")
            log.warning("skipping plugin %r from %s: %s", ep.name, dist_name, error)
            broken.append(BrokenPlugin(ep.name, dist_name, error))
            continue
        if ep.name in seen and seen[ep.name] != dist_name:
            raise PluginError(
                f"plugin name {ep.name!r} is registered by both {seen[ep.name]} and "
                f"{dist_name}; uninstall one"
            )
        seen[ep.name] = dist_name
        if pm.get_plugin(ep.name) is not None:
            continue  # the same distribution seen twice on sys.path
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # broken third-party code: log, skip, remember
            error = one_line(f"{type(exc).__name__}: {exc}")
            log.warning("skipping plugin %s from %s: %s", ep.name, dist_name, error)
            broken.append(BrokenPlugin(ep.name, dist_name, error))
            continue
        infos.append(PluginInfo(ep.name, dist_name, dist_version, (), False))


def make_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """Build a fresh plugin manager (never a module-level singleton).

    Raises `PluginError` for a conflict (two distributions, one name) or a broken built-in;
    a broken installed plugin is logged, skipped and listed in `manager.broken`."""
    from pylium import __version__

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    broken: list[BrokenPlugin] = []

    for module_name in BUILTIN_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        infos.append(PluginInfo(module_name, "pylium", __version__, (), True))

    if load_entry_points:
        _register_entry_points(pm, infos, broken)

    manager = PluginManager(pm, infos, broken)
    while True:  # a hookimpl with no matching spec (e.g. a typo) breaks only its plugin
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin)
            info = next((i for i in manager.infos if i.name == name), None)
            if info is None or info.builtin:
                raise PluginError(f"plugin validation failed: {one_line(exc)}") from exc
            manager._mark_broken(name, info.dist, f"PluginValidationError: {exc}")
    manager._drop_broken_providers()
    for kind in CAPABILITY_KINDS:  # conflicts surface now, not at the first lookup
        manager.capabilities(kind)

    if _tracing():
        _trace_hook_calls(pm)

    manager.infos = [attrs.evolve(i, hooks=manager.hooks_of(i.name)) for i in manager.infos]
    return manager
