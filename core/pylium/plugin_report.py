"""What `pylium plugins` shows: every installed plugin with its distribution, version,
hooks, capabilities, whether config selects each capability and its state (`running`,
`failed: <reason>`, `not selected`; offline: `selected (agent not running)`). Shared by the
CLI and the API."""

from __future__ import annotations

from typing import Any

from pylium.api.records import CAPABILITY_KINDS
from pylium.plugins import PluginManager

OFFLINE_SELECTED = "selected (agent not running)"


def plugin_report(manager: PluginManager, selected: dict[str, list[str]],
                  states: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """`states`: (kind, name) -> state from the running agent's capability lifecycle; None
    when asked offline."""
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
            if states is not None:
                state = states.get((kind, cap_name), "not started" if is_selected
                                   else "not selected")
            else:
                state = OFFLINE_SELECTED if is_selected else "not selected"
            rows[info.name]["capabilities"].append(
                {"kind": kind, "name": cap_name, "dist": info.dist, "version": info.version,
                 "selected": is_selected,
                 "description": record.description, "state": state,
                 "bpf_sources": [str(p) for p in record.bpf_sources]})
            rows[info.name]["selected"] |= is_selected
    for broken in manager.broken:
        rows[broken.name] = {
            "name": broken.name, "dist": broken.dist, "version": "", "builtin": False,
            "hooks": [], "capabilities": [], "selected": False,
            "status": f"failed to load: {broken.error}",
        }
    return sorted(rows.values(), key=lambda r: (not r["builtin"], r["name"]))
