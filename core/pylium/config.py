"""Agent configuration: defaults < YAML file < `PYLIUM_*` environment < command-line flags.

One frozen model, one converter; unknown keys and bad values are refused with the key's
name and where it came from (file, env or flag)."""

from __future__ import annotations

import ipaddress
import os
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from pylium.documents import DocumentError, load_yaml
from pylium.errors import ConfigError
from pylium.hardening import check_config_file

ENV_PREFIX = "PYLIUM_"
DEFAULT_SOCKET = Path("/var/run/pylium/pylium.sock")
DEFAULT_CONFIG_FILE = Path("/etc/pylium/config.yaml")


def _pos(_inst, attr, value) -> None:
    if value <= 0:
        raise ValueError(f"{attr.name} must be positive")


def _policy_map_max(_inst, attr, value) -> None:
    if not 2 <= value <= 65536:  # the meta entry and one rule; C POLICY_ENTRIES_MAX
        raise ValueError(f"{attr.name} must be between 2 and 65536, got {value}")


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
    #: with encryption selected, pods may still reach nodes that published no key, in
    #: plaintext (Cilium's rollout gap, opened on purpose only); default: such nodes are
    #: unreachable from pods
    encryption_allow_plaintext: bool = False
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
    #: a TCP connection after FIN or RST (Cilium's bpf-ct-timeout-regular-tcp-fin)
    ct_timeout_fin: int = attrs.field(default=10, validator=_pos)
    #: conntrack entries per node, TCP and the rest in one map (Cilium splits it into
    #: bpf-ct-global-tcp-max and -any-max); changing it on a node re-creates the map
    bpf_ct_global_max: int = attrs.field(default=65536, validator=_pos)
    #: entries each endpoint's policy map holds (Cilium: --bpf-policy-map-max, 16384 there);
    #: at most the compiled POLICY_ENTRIES_MAX (65536)
    bpf_policy_map_max: int = attrs.field(default=65536, validator=_policy_map_max)
    #: Prometheus metrics listen address ("" = off); Cilium's agent uses :9962
    prometheus_serve_addr: str = ""
    #: where the agent writes the CNI conflist `05-pylium.conflist` once its API answers
    #: (the runtime's CNI config dir, e.g. /etc/cni/net.d; "" = write none)
    cni_conf_dir: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"


FIELDS = {f.name: f for f in attrs.fields(AgentConfig)}


def _int(value: Any, _type) -> int:
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def _bool(value: Any, _type) -> bool:
    """YAML booleans, or the words an environment variable or flag carries."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _str(value: Any, _type) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _path(value: Any, _type) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"expected a path, got {value!r}")
    return Path(value)


def _names(value: Any, _type) -> tuple[str, ...]:
    """A list of names: a YAML list, or one comma-separated string."""
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of names, got {value!r}")
    return tuple(value)


def _mapping(value: Any, _type) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    return dict(value)


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(Path, _path)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _names)
    conv.register_structure_hook_func(
        lambda t: typing.get_origin(t) is dict and t.__args__[0] is str, _mapping)
    return conv


def _explain(exc: cattrs.ClassValidationError) -> tuple[str, str]:
    """(field, message) for the first problem, without cattrs' internals."""
    for leaf in _leaves(exc):
        notes = getattr(leaf, "__notes__", [])
        field = next((n.rsplit("@ attribute ", 1)[1] for n in notes if "@ attribute " in n), "")
        message = str(leaf)
        if isinstance(leaf, cattrs.errors.CattrsError) and "not in literal" in message:
            choices = typing.get_args(typing.get_type_hints(AgentConfig)[field])
            value = message.split(" not in literal", 1)[0]
            message = f"must be one of {', '.join(choices)}, got {value!r}"
        if not field:  # attrs validators raise "<field> ..." from __init__
            head = message.split(" ", 1)[0].rstrip(":")
            if head in FIELDS:
                field, message = head, message[len(head):].lstrip(": ")
        return field, message
    return "", str(exc)


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


CONVERTER = _converter()


def _parse_scalar(name: str, raw: str, where: str) -> Any:
    """Turn an env/flag string into the field's shape (lists comma-separated, dicts YAML)."""
    field = FIELDS[name]
    text = str(field.type)
    if text.startswith("tuple"):
        return [p.strip() for p in raw.split(",") if p.strip()]
    if text.startswith("dict"):
        what = f"{where}: {name}"
        try:
            value = load_yaml(raw, what)
        except DocumentError as exc:
            detail = str(exc).removeprefix(f"{what}: ")
            raise ConfigError(f"{what}: not valid YAML/JSON: {detail}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name}: expected a mapping, got {raw!r}")
        return value
    return raw


def load_file(path: Path) -> dict[str, Any]:
    check_config_file(Path(path))
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = load_yaml(raw, f"config file {path}")
    except DocumentError as exc:
        raise ConfigError(str(exc)) from None
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
        out[name] = _parse_scalar(name, raw, f"environment {key}")
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
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        for k, v in load_file(path).items():
            merged[k], sources[k] = v, f"config file {path}"
    for k, v in from_env(environ).items():
        merged[k], sources[k] = v, f"environment {ENV_PREFIX}{k.upper()}"
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if isinstance(v, str) and k in FIELDS:
            v = _parse_scalar(k, v, f"flag --{k.replace('_', '-')}")
        merged[k], sources[k] = v, f"flag --{k.replace('_', '-')}"
    unknown = sorted(set(merged) - set(FIELDS))
    if unknown:
        where = sources[unknown[0]]
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(FIELDS)})")
    for key, value in merged.items():
        if value is None:
            raise ConfigError(f"{sources[key]}: {key}: no value given")
    try:
        return CONVERTER.structure(merged, AgentConfig)
    except cattrs.ClassValidationError as exc:
        field, message = _explain(exc)
        where = sources.get(field, "config")
        raise ConfigError(f"{where}: {field}: {message}" if field else f"{where}: {message}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config: {exc}") from None


def to_dict(config: AgentConfig) -> dict[str, Any]:
    data = CONVERTER.unstructure(config)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in data.items()}
