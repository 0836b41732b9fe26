"""Agent configuration: defaults < YAML file < `PYLIUM_*` environment < command-line flags.

One frozen model, one converter; unknown keys and bad values are refused with the key's
name and where it came from (file, env or flag)."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs
import yaml

from pylium.errors import ConfigError

ENV_PREFIX = "PYLIUM_"
DEFAULT_SOCKET = Path("/var/run/pylium/pylium.sock")
DEFAULT_CONFIG_FILE = Path("/etc/pylium/config.yaml")


def _pos(_inst, attr, value) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be positive")


def _cidr(_inst, attr, value) -> None:
    try:
        ipaddress.IPv4Network(value)
    except ValueError as exc:
        raise ValueError(f"{attr.name}: {exc}") from None


@attrs.frozen(kw_only=True)
class AgentConfig:
    """Everything the agent reads at start-up. Field names are the YAML keys; the env var
    is `PYLIUM_` + the upper-cased name; the flag is `--` + the name with '-'."""

    node_name: str = attrs.field(factory=socket.gethostname)
    socket: Path = DEFAULT_SOCKET
    state_dir: Path = Path("/var/lib/pylium")
    bpffs_root: Path = Path("/sys/fs/bpf/pylium")
    #: selected plugins, by capability name
    routing_mode: str = "local"
    kvstore: str = "embedded"
    orchestrator: str = "standalone"
    l7_parsers: tuple[str, ...] = ()
    encryption: str = ""
    #: per-plugin options: {capability name: {option: value}}
    plugin_options: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    kvstore_options: dict[str, Any] = attrs.field(factory=dict)
    #: this node's pod CIDR (IPAM hands out addresses from it) and underlay address
    pod_cidr: str = attrs.field(default="10.200.0.0/24", validator=_cidr)
    node_ip: str = ""
    #: Cilium's policy enforcement modes
    enforcement: Literal["default", "always", "never"] = "default"
    #: conntrack lifetimes in seconds (Cilium: TCP 21600, non-TCP 60, SYN 60)
    ct_timeout_tcp: int = attrs.field(default=21600, validator=_pos)
    ct_timeout_non_tcp: int = attrs.field(default=60, validator=_pos)
    ct_timeout_syn: int = attrs.field(default=60, validator=_pos)
    #: Prometheus metrics listen address ("" = off); Cilium's agent uses :9962
    prometheus_serve_addr: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"


FIELDS = {f.name: f for f in attrs.fields(AgentConfig)}


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(Path, lambda v, _t: Path(str(v)))
    return conv


CONVERTER = _converter()


def _parse_scalar(name: str, raw: str) -> Any:
    """Turn an env/flag string into the field's shape (lists comma-separated, dicts YAML)."""
    field = FIELDS[name]
    text = str(field.type)
    if text.startswith("tuple"):
        return [p.strip() for p in raw.split(",") if p.strip()]
    if text.startswith("dict"):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: not valid YAML/JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {raw!r}")
        return value
    return raw


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of settings at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in ("PYLIUM_CONFIG", "PYLIUM_TRACE_PLUGINS"):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in FIELDS:
            continue  # other tools' PYLIUM_* variables (e.g. PYLIUM_SOCKET for the CLI) pass
        out[name] = _parse_scalar(name, raw)
    return out


def load(
    path: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Merge defaults, file, env and flag overrides into a validated `AgentConfig`."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is None and environ.get("PYLIUM_CONFIG"):
        path = Path(environ["PYLIUM_CONFIG"])
    if path is not None:
        for k, v in load_file(path).items():
            merged[k], sources[k] = v, f"config file {path}"
    for k, v in from_env(environ).items():
        merged[k], sources[k] = v, f"environment {ENV_PREFIX}{k.upper()}"
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if isinstance(v, str) and k in FIELDS:
            v = _parse_scalar(k, v)
        merged[k], sources[k] = v, f"flag --{k.replace('_', '-')}"
    unknown = sorted(set(merged) - set(FIELDS))
    if unknown:
        where = sources[unknown[0]]
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(FIELDS)})")
    try:
        return CONVERTER.structure(merged, AgentConfig)
    except cattrs.ClassValidationError as exc:
        messages = cattrs.transform_error(exc)
        first = messages[0] if messages else str(exc)
        key = first.split("$.", 1)[-1].split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0]
        where = sources.get(key, "config")
        raise ConfigError(f"{where}: {first}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config: {exc}") from None


def to_dict(config: AgentConfig) -> dict[str, Any]:
    data = CONVERTER.unstructure(config)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in data.items()}
