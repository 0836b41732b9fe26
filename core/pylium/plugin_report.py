"""What `pylium plugins` shows: every installed plugin with its distribution, version,
hooks, capabilities and whether config selects it. Shared by the CLI and the API."""

from __future__ import annotations

from typing import Any

from pylium.api.records import CAPABILITY_KINDS
from pylium.plugins import PluginManager


def plugin_report(manager: PluginManager, selected: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for info in manager.infos:
        rows[info.name] = {
            "name": info.name, "dist": info.dist, "version": info.version,
            "builtin": info.builtin, "hooks": list(info.hooks), "capabilities": [],
            "selected": False, "status": "ok",
        }
    for kind in CAPABILITY_KINDS:
        for cap_name, (record, info) in manager.capabilities(kind).items():
            is_selected = cap_name in selected.get(kind, [])
            rows[info.name]["capabilities"].append(
                {"kind": kind, "name": cap_name, "selected": is_selected,
                 "description": record.description})
            rows[info.name]["selected"] |= is_selected
    for broken in manager.broken:
        rows[broken.name] = {
            "name": broken.name, "dist": broken.dist, "version": "", "builtin": False,
            "hooks": [], "capabilities": [], "selected": False,
            "status": f"failed to load: {broken.error}",
        }
    return sorted(rows.values(), key=lambda r: (not r["builtin"], r["name"]))
