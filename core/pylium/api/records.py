"""Typed, frozen capability records returned by the capability hooks.

Each record names one capability, the backend class implementing the core's abstract base
for that kind, the BPF C sources the plugin contributes and the `-D` defines to compile
them with (the core compiles and loads them; a plugin never calls libbpf). Validation happens at construction so a bad plugin fails where it is written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import attrs

from pylium.api.encryption import Encryption
from pylium.api.kvstore import KVStore
from pylium.api.l7 import L7Parser
from pylium.api.orchestrator import Orchestrator
from pylium.api.routing import RoutingMode

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
DEFINE_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _check_name(_inst, _attr, value: str) -> None:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"invalid capability name {value!r}: use lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )


def _to_paths(value) -> tuple[Path, ...]:
    return tuple(Path(v) for v in value)


def _check_defines(_inst, _attr, value) -> None:
    for key, val in value.items():
        if not DEFINE_RE.match(key):
            raise ValueError(f"invalid -D define name {key!r}")
        if not isinstance(val, (str, int)):
            raise ValueError(f"-D define {key} must be a string or int, got {type(val).__name__}")


@attrs.frozen
class Capability:
    """What every capability record carries."""

    base: ClassVar[type] = object
    kind: ClassVar[str] = ""

    name: str = attrs.field(validator=_check_name)
    backend: type = attrs.field()
    description: str = ""
    bpf_sources: tuple[Path, ...] = attrs.field(default=(), converter=_to_paths)
    defines: dict = attrs.field(factory=dict, validator=_check_defines)
    #: defines only the backend can know (an ifindex it creates, an address it is given):
    #: the core then loads `bpf_sources` when the backend calls `context.load_bpf(**values)`
    #: with exactly these names, instead of before building it
    runtime_defines: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @runtime_defines.validator
    def _check_runtime_defines(self, _attr, value) -> None:
        for name in value:
            if not isinstance(name, str) or not DEFINE_RE.match(name):
                raise ValueError(f"invalid runtime define name {name!r}")
        if value and not self.bpf_sources:
            raise ValueError(f"{self.kind} {self.name!r}: runtime_defines without bpf_sources")

    @backend.validator
    def _check_backend(self, _attr, value) -> None:
        if not (isinstance(value, type) and issubclass(value, self.base)):
            raise TypeError(
                f"{self.kind} {self.name!r}: backend must be a subclass of "
                f"{self.base.__module__}.{self.base.__qualname__}, got {value!r}"
            )


@attrs.frozen
class RoutingModeRecord(Capability):
    base: ClassVar[type] = RoutingMode
    kind: ClassVar[str] = "routing mode"


@attrs.frozen
class KVStoreRecord(Capability):
    base: ClassVar[type] = KVStore
    kind: ClassVar[str] = "kvstore"


@attrs.frozen
class L7ParserRecord(Capability):
    base: ClassVar[type] = L7Parser
    kind: ClassVar[str] = "l7 parser"


@attrs.frozen
class EncryptionRecord(Capability):
    base: ClassVar[type] = Encryption
    kind: ClassVar[str] = "encryption"


@attrs.frozen
class OrchestratorRecord(Capability):
    base: ClassVar[type] = Orchestrator
    kind: ClassVar[str] = "orchestrator"


#: capability kind -> (hook name, record type)
CAPABILITY_KINDS: dict[str, tuple[str, type[Capability]]] = {
    "routing": ("pylium_routing_modes", RoutingModeRecord),
    "kvstore": ("pylium_kvstores", KVStoreRecord),
    "l7": ("pylium_l7_parsers", L7ParserRecord),
    "encryption": ("pylium_encryptions", EncryptionRecord),
    "orchestrator": ("pylium_orchestrators", OrchestratorRecord),
}
