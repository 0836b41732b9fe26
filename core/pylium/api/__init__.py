"""Abstract bases for every pluggable capability, and the frozen records plugins return.

Plugins import from here (and from `pylium.hookspecs`); the core never imports a plugin."""

from pylium.api.encryption import Encryption
from pylium.api.kvstore import (
    KVEvent,
    KVItem,
    KVStore,
    KVStoreCompacted,
    KVStoreTimeout,
    KVStoreUnavailable,
    Lease,
    LeaseNotFound,
)
from pylium.api.l7 import L7Parser, L7Request, L7Verdict
from pylium.api.orchestrator import Orchestrator
from pylium.api.records import (
    CAPABILITY_KINDS,
    Capability,
    EncryptionRecord,
    KVStoreRecord,
    L7ParserRecord,
    OrchestratorRecord,
    RoutingModeRecord,
)
from pylium.api.routing import NodeInfo, RoutingMode

__all__ = [
    "CAPABILITY_KINDS",
    "Capability",
    "Encryption",
    "EncryptionRecord",
    "KVEvent",
    "KVItem",
    "KVStore",
    "KVStoreCompacted",
    "KVStoreTimeout",
    "KVStoreUnavailable",
    "KVStoreRecord",
    "L7Parser",
    "L7ParserRecord",
    "L7Request",
    "L7Verdict",
    "Lease",
    "LeaseNotFound",
    "NodeInfo",
    "Orchestrator",
    "OrchestratorRecord",
    "RoutingMode",
    "RoutingModeRecord",
]
