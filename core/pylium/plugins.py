"""The one plugin-manager factory and selection of capabilities by name.

Order: built-in plugins (explicit tuple), then the `pylium` entry-point group, then
`check_pending()`. An installed plugin that fails to load is logged and skipped unless it is
selected; a selected capability that is missing stops start-up with one clear line."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable
from importlib.metadata import Distribution, entry_points

import attrs
import pluggy

from pylium import hookspecs
from pylium.api.records import CAPABILITY_KINDS, Capability
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
            try:
                records = list(impl.function() or ())
            except Exception as exc:  # a plugin bug must not take the core down
                raise PluginError(
                    f"plugin {info.name} ({info.dist}) failed in {hook_name}: {exc}"
                ) from exc
            for record in records:
                if not isinstance(record, record_type):
                    raise PluginError(
                        f"plugin {info.name} ({info.dist}) returned {type(record).__name__} "
                        f"from {hook_name}; expected {record_type.__name__}"
                    )
                if record.name in found:
                    other = found[record.name][1]
                    raise PluginError(
                        f"{record.kind} {record.name!r} is provided by both {other.dist} "
                        f"({other.name}) and {info.dist} ({info.name}); uninstall one"
                    )
                found[record.name] = (record, info)
        return dict(sorted(found.items()))

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


def _dist_of(ep) -> Distribution | None:
    return getattr(ep, "dist", None)


def _entry_points() -> Iterable:
    return entry_points(group=ENTRY_POINT_GROUP)


def make_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """Build a fresh plugin manager (never a module-level singleton)."""
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
        seen: dict[str, str] = {}
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            dist = _dist_of(ep)
            dist_name = dist.metadata["Name"] if dist else "?"
            dist_version = dist.version if dist else "?"
            if ep.name in seen and seen[ep.name] != dist_name:
                raise PluginError(
                    f"plugin name {ep.name!r} is registered by both {seen[ep.name]} and "
                    f"{dist_name}; uninstall one"
                )
            seen[ep.name] = dist_name
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
                pm.register(module, name=ep.name)
            except Exception as exc:  # broken third-party code: log, skip, remember
                log.warning("skipping plugin %s from %s: %s", ep.name, dist_name, exc)
                broken.append(BrokenPlugin(ep.name, dist_name, f"{type(exc).__name__}: {exc}"))
                continue
            infos.append(PluginInfo(ep.name, dist_name, dist_version, (), False))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin validation failed: {exc}") from exc

    if os.environ.get("PYLIUM_TRACE_PLUGINS") == "1":
        pm.add_hookcall_monitoring(
            lambda name, impls, kw: log.info("hook %s -> %s", name, [i.plugin_name for i in impls]),
            lambda outcome, name, impls, kw: log.info("hook %s done", name),
        )

    manager = PluginManager(pm, infos, broken)
    manager.infos = [attrs.evolve(i, hooks=manager.hooks_of(i.name)) for i in infos]
    return manager
