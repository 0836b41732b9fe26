"""`pylium version | status | plugins | config view | agent`."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from pylium import __version__
from pylium import config as config_mod
from pylium.cli.client import client_from
from pylium.cli.output import emit, make_table, output_option
from pylium.errors import AgentUnreachable
from pylium.plugin_report import plugin_report
from pylium.plugins import make_plugin_manager


def _selected_from(cfg: config_mod.AgentConfig) -> dict[str, list[str]]:
    from pylium.agent.daemon import Daemon

    return Daemon.selected(type("C", (), {"config": cfg})())


def _plugins_table(rows):
    return make_table(
        ["NAME", "DISTRIBUTION", "VERSION", "CAPABILITIES", "SELECTED", "STATUS"],
        [[r["name"], r["dist"], r["version"],
          ", ".join(f"{c['kind']}:{c['name']}"
                    + (f" ({c['state']})" if c.get("selected") or c.get("state", "")
                       .startswith("failed") else "") for c in r["capabilities"]),
          "yes" if r["selected"] else "", r["status"]] for r in rows])


def _capabilities_lines(rows) -> list[str]:
    return [f"  {r['kind'] + ':':<14}{r['name']:<12}{r['state']}"
            + (f"  [{r['dist']} {r['version']}]" if r.get("dist") else "")
            + (f"  bpf: {', '.join(r['bpf']['programs'])}" if r.get("bpf") else "")
            for r in rows if r.get("selected")]


def _encryption_line(rows) -> str:
    """Cilium's `Encryption:` line of `cilium status`."""
    for r in rows:
        if r.get("kind") == "encryption" and r.get("selected"):
            st = r.get("status") or {}
            if not st.get("interface"):
                return f"Encryption:    {r['name']} ({r['state']})"
            return (f"Encryption:    {st.get('mode', r['name']).capitalize()} "
                    f"[{st.get('implementation', '')}, {st['interface']} "
                    f"(Pubkey: {st.get('public_key', '-')}, Port: {st.get('port', '-')}, "
                    f"Peers: {len(st.get('peers', []))})]")
    return "Encryption:    Disabled"


def _status_table(s):
    kv = s.get("kvstore", {})
    lines = [
        f"Version:       {s['version']}",
        f"Node:          {s['node']}",
        f"Health:        {'Ok' if s['healthy'] else 'Degraded'}",
        f"KVStore:       {kv.get('backend', '?')}  {'Ok' if kv.get('healthy') else 'Failure'}"
        f"  {kv.get('detail', '')}"
        + (f"  (cluster state: {kv['cluster']})" if kv.get("cluster") else ""),
        "Plugins:       " + ", ".join(f"{k}={','.join(v) or '-'}" for k, v in s["plugins"].items()),
        "Capabilities:",
        *_capabilities_lines(s.get("capabilities", [])),
        _encryption_line(s.get("capabilities", [])),
        f"Components:    {', '.join(s.get('components', [])) or '-'}",
        f"Uptime:        {s['uptime_seconds']}s",
    ]
    for key, value in s.items():
        if isinstance(value, dict) and key not in ("kvstore", "plugins", "capabilities"):
            lines.append(f"{key.capitalize() + ':':<15}" + ", ".join(f"{k}={v}" for k, v in value.items()))
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    @cli.command()
    @output_option
    def version(output: str) -> None:
        """Print the pylium version."""
        emit({"version": __version__}, output, lambda d: f"pylium {d['version']}")

    @cli.command()
    @output_option
    @click.pass_context
    def status(ctx, output: str) -> None:
        """Agent health and what it runs (asks the agent)."""
        emit(client_from(ctx).get("/v1/status"), output, _status_table)

    @cli.command()
    @output_option
    @click.option("--config", "config_file", type=click.Path(path_type=Path),
                  help="Config file whose selection to show (offline).")
    @click.pass_context
    def plugins(ctx, output: str, config_file: Path | None) -> None:
        """Installed plugins: distribution, version, hooks, capabilities, selected, state.

        Asks the running agent for each capability's state; with --config, or when no agent
        answers, lists what is installed and what the config selects."""
        rows = None
        if config_file is None:
            try:
                rows = client_from(ctx).get("/v1/plugins")
            except AgentUnreachable:
                rows = None
        if rows is None:
            cfg = config_mod.load(config_file)
            rows = plugin_report(make_plugin_manager(), _selected_from(cfg))
        emit(rows, output, _plugins_table)

    @cli.group("config")
    def config_group() -> None:
        """Agent configuration."""

    @config_group.command("view")
    @output_option
    @click.option("--config", "config_file", type=click.Path(path_type=Path),
                  help="Show this file merged with env and defaults instead of asking the agent.")
    @click.pass_context
    def config_view(ctx, output: str, config_file: Path | None) -> None:
        """Show the effective agent configuration."""
        if config_file is not None:
            data = config_mod.to_dict(config_mod.load(config_file))
        else:
            data = client_from(ctx).get("/v1/config")
        emit(data, output if output != "table" else "yaml")

    @cli.command()
    @click.option("--config", "config_file", type=click.Path(path_type=Path),
                  help="YAML config file (also PYLIUM_CONFIG).")
    @click.option("--node-name")
    @click.option("--socket", "socket_path", help="API socket path.")
    @click.option("--state-dir")
    @click.option("--bpffs-root")
    @click.option("--routing-mode")
    @click.option("--kvstore")
    @click.option("--kvstore-options", help="YAML/JSON mapping of KV-store options.")
    @click.option("--orchestrator")
    @click.option("--l7-parsers", help="Comma-separated L7 parser names.")
    @click.option("--encryption")
    @click.option("--pod-cidr")
    @click.option("--node-ip")
    @click.option("--enforcement", type=click.Choice(["default", "always", "never"]))
    @click.option("--bpf-policy-map-max", help="Entries each endpoint's policy map holds.")
    @click.option("--prometheus-serve-addr")
    @click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
    @click.pass_context
    def agent(ctx, config_file: Path | None, **flags) -> None:
        """Run the pylium agent (foreground)."""
        from pylium.agent.daemon import Daemon
        from pylium.agent.server import serve
        from pylium.hardening import check_state_dir

        overrides = {k: v for k, v in flags.items() if v is not None}
        if "socket_path" in overrides:
            overrides["socket"] = overrides.pop("socket_path")
        cfg = config_mod.load(config_file, overrides)
        check_state_dir(cfg.state_dir)
        debug = ctx.find_root().obj["debug"]
        logging.basicConfig(force=True, level="DEBUG" if debug else cfg.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        daemon = Daemon(cfg)
        daemon.check_selection()
        from pylium import gcpolicy

        gcpolicy.tune()
        asyncio.run(serve(daemon, after_start=gcpolicy.settle))
