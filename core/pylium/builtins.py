"""Capabilities that ship inside the core: the embedded KV store, the single-node routing
mode and the standalone orchestrator. Registered before any entry point."""

from pylium.api import KVStoreRecord, OrchestratorRecord, RoutingModeRecord
from pylium.hookspecs import hookimpl
from pylium.kvstore.embedded import EmbeddedKVStore
from pylium.local_defaults import LocalRouting, StandaloneOrchestrator


@hookimpl
def pylium_kvstores():
    return [
        KVStoreRecord(
            name="embedded",
            backend=EmbeddedKVStore,
            description="SQLite-backed store on this node's disk (no server; one node)",
        )
    ]


@hookimpl
def pylium_routing_modes():
    return [
        RoutingModeRecord(
            name="local",
            backend=LocalRouting,
            description="Single node: pods on this host only, no cross-node routing",
        )
    ]


@hookimpl
def pylium_orchestrators():
    return [
        OrchestratorRecord(
            name="standalone",
            backend=StandaloneOrchestrator,
            description="Endpoints and policies come from the agent API / CLI / lab",
        )
    ]
