"""A third-party plugin for tests: one capability of every kind, each contributing the same
small BPF program through its record, every lifecycle step and event hook written as one
JSON line to the file named by $RECORDING_LOG (the test reads the order back)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pylium.api import (
    Encryption,
    EncryptionRecord,
    KVStoreRecord,
    L7Parser,
    L7ParserRecord,
    L7Verdict,
    Orchestrator,
    OrchestratorRecord,
    RoutingMode,
    RoutingModeRecord,
)
from pylium.hookspecs import hookimpl
from pylium.kvstore.embedded import EmbeddedKVStore

SOURCE = Path(__file__).with_name("recording.bpf.c")


def record(event: str, **fields) -> None:
    with open(os.environ["RECORDING_LOG"], "a") as log:
        log.write(json.dumps({"event": event, **fields}, default=str) + "\n")


def bpf_fd(context) -> int:
    return context.bpf.program("recording_prog") if context.bpf is not None else -1


class RecordingKV(EmbeddedKVStore):
    name = "recording-kv"

    async def open(self) -> None:
        await super().open()
        record("start", kind="kvstore", state_dir=str(self.state_dir))

    async def close(self) -> None:
        record("stop", kind="kvstore")
        await super().close()


class RecordingRouting(RoutingMode):
    name = "recording-routing"

    def setup_node(self, local) -> None:
        record("start", kind="routing", node=local.name, fd=bpf_fd(self.context),
               underlay=self.context.underlay_ifname, datapath=self.context.datapath is not None,
               options=dict(self.options))

    def node_joined(self, node) -> None:
        record("routing_node_joined", node=node.name)

    def node_left(self, node) -> None:
        record("routing_node_left", node=node.name)

    def teardown(self) -> None:
        record("teardown", kind="routing")

    def close(self) -> None:
        record("stop", kind="routing")


class RecordingEncryption(Encryption):
    name = "recording-encryption"

    def setup_node(self, local) -> str:
        record("start", kind="encryption", fd=bpf_fd(self.context),
               routing_mode=self.context.routing_mode)
        return "recording-public-key"

    def node_joined(self, node) -> None:
        record("encryption_node_joined", node=node.name)

    def node_left(self, node) -> None:
        record("encryption_node_left", node=node.name)

    def teardown(self) -> None:
        record("teardown", kind="encryption")

    def close(self) -> None:
        record("stop", kind="encryption")


class RecordingL7(L7Parser):
    protocol = "recording"

    def judge(self, rules, request) -> L7Verdict:
        return L7Verdict(allowed=False, reason="the recording parser judges nothing")

    async def start(self) -> None:
        self.unsubscribe = self.context.policy.subscribe(self.policy_changed)
        record("start", kind="l7", fd=bpf_fd(self.context),
               proxy_ports=dict(self.context.proxy_ports))

    def policy_changed(self) -> None:
        snapshot = self.context.policy.snapshot()
        record("l7_snapshot", entries=[
            {"ipv4": ep["ipv4"], "port": key.port, "kinds": sorted({g.kind for g in grants})}
            for ep in snapshot for key, grants in ep["entries"]])

    async def stop(self) -> None:
        self.unsubscribe()
        record("stop", kind="l7")

    def served_ports(self) -> set[int]:
        """No proxy runs; the test says which ports to claim through a file."""
        claim = Path(self.context.state_dir) / "serve"
        return {int(p) for p in claim.read_text().split()} if claim.exists() else set()


class RecordingOrchestrator(Orchestrator):
    name = "recording-orchestrator"

    async def start(self) -> None:
        record("start", kind="orchestrator", fd=bpf_fd(self.context),
               has_endpoints=self.context.endpoints is not None,
               has_policy=self.context.policy is not None)

    async def stop(self) -> None:
        record("stop", kind="orchestrator")


def _record(type_, name, backend, kind_number):
    return type_(name=name, backend=backend, description=f"recording {name}",
                 bpf_sources=(SOURCE,), defines={"RECORDING_KIND": kind_number})


@hookimpl
def pylium_kvstores():
    return [KVStoreRecord(name="recording-kv", backend=RecordingKV, description="recording")]


@hookimpl
def pylium_routing_modes():
    return [_record(RoutingModeRecord, "recording-routing", RecordingRouting, 1)]


@hookimpl
def pylium_encryptions():
    return [_record(EncryptionRecord, "recording-encryption", RecordingEncryption, 2)]


@hookimpl
def pylium_l7_parsers():
    return [_record(L7ParserRecord, "recording-l7", RecordingL7, 3)]


@hookimpl
def pylium_orchestrators():
    return [_record(OrchestratorRecord, "recording-orchestrator", RecordingOrchestrator, 4)]


@hookimpl
def pylium_endpoint_created(endpoint) -> None:
    record("hook_endpoint_created", name=endpoint.name, ipv4=endpoint.ipv4)


@hookimpl
def pylium_endpoint_deleted(endpoint) -> None:
    record("hook_endpoint_deleted", name=endpoint.name)


@hookimpl
def pylium_node_joined(node) -> None:
    record("hook_node_joined", node=node.name)


@hookimpl
def pylium_node_left(node) -> None:
    record("hook_node_left", node=node.name)


@hookimpl
def pylium_policy_changed(revision, added, deleted) -> None:
    record("hook_policy_changed", revision=revision, added=[r.name for r in added],
           deleted=[r.name for r in deleted])


@hookimpl
def pylium_l7_parser_for_port(port, protocol):
    record("hook_l7_parser_for_port", port=port, protocol=protocol)
    return "recording-l7" if port == 80 else None
