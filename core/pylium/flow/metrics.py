"""Prometheus metrics of one agent, named after Cilium's and Hubble's where one exists.

A custom collector reads the counters the flow decoder keeps (one dict update per event) and
asks the other components at scrape time; a missing component just means its metrics are
absent. Datapath packet counters come from the datapath's metrics map when the datapath
component offers one (`read_metrics()`), otherwise from the observed events."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pylium.flow.model import (
    DIRECTIONS,
    DROP_REASON_TEXT,
    EVENT_DROP,
    EVENT_POLICY_VERDICT,
    EVENT_TRACE,
    LOST_AGENT,
    LOST_FOLLOWER,
    LOST_KERNEL,
    LOST_METRIC_SOURCE,
)

log = logging.getLogger(__name__)

POLICY_ACTION = {"FORWARDED": "allow", "DROPPED": "deny", "REDIRECTED": "redirect",
                 "AUDIT": "audit"}


def drop_reason_label(code: int) -> str:
    """Cilium labels drops with the human reason text ("Policy denied")."""
    return DROP_REASON_TEXT.get(code, f"{code}")


def _direction(d: int) -> str:
    return DIRECTIONS[d & 1] if d in (0, 1) else "UNKNOWN"


def _call(obj: Any, *names: str) -> Any:
    for name in names:
        fn = getattr(obj, name, None)
        if callable(fn):
            return fn()
    return None


class AgentCollector:
    """Collects at scrape time from a `FlowObserver` (and its daemon, if any)."""

    def __init__(self, observer):
        self.observer = observer
        #: filled by the HTTP handler right before each scrape (async status calls)
        self.kvstore_status: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        obs = self.observer
        counts = dict(obs.decoder.counts)
        yield from self._flow_metrics(counts)
        yield from self._lost_metrics()
        yield from self._datapath_metrics(counts)
        yield from self._component_metrics()

    def _flow_metrics(self, counts) -> Iterator[Metric]:
        processed = CounterMetricFamily(
            "pylium_flows_processed", "Flows decoded from datapath events (Hubble: "
            "hubble_flows_processed_total).", labels=["type", "subtype", "verdict"])
        by_label: dict[tuple[str, str, str], int] = {}
        verdicts = CounterMetricFamily(
            "pylium_policy_verdict", "Policy verdict events (Cilium: cilium_policy_verdict).",
            labels=["action", "direction", "match"])
        by_verdict: dict[tuple[str, str, str], int] = {}
        for (kind, verdict, _drop, direction), n in counts.items():
            subtype = {1: "drop", 2: "trace", 3: "policy-verdict", 129: "l7"}.get(kind,
                                                                                  "unknown")
            key = ("L7" if kind == 129 else "L3_L4", subtype, verdict)
            by_label[key] = by_label.get(key, 0) + n
            if kind == EVENT_POLICY_VERDICT:
                action = POLICY_ACTION.get(verdict, "unknown")
                match = "none" if action == "deny" else "l3-l4"
                vk = (action, _direction(direction), match)
                by_verdict[vk] = by_verdict.get(vk, 0) + n
        for key, n in sorted(by_label.items()):
            processed.add_metric(list(key), n)
        for key, n in sorted(by_verdict.items()):
            verdicts.add_metric(list(key), n)
        yield processed
        yield verdicts

    def _lost_metrics(self) -> Iterator[Metric]:
        obs = self.observer
        lost = CounterMetricFamily(
            "pylium_events_lost", "Events lost, by where they were lost (never silent).",
            labels=["source"])
        lost.add_metric([LOST_METRIC_SOURCE[LOST_KERNEL]], obs.kernel_lost)
        lost.add_metric([LOST_METRIC_SOURCE[LOST_AGENT]], obs.malformed)
        lost.add_metric([LOST_METRIC_SOURCE[LOST_FOLLOWER]], obs.ring.follower_lost)
        yield lost
        ring = obs.ring
        yield GaugeMetricFamily("pylium_flow_ring_capacity", "Flows the agent's ring can hold.",
                                value=ring.capacity)
        yield GaugeMetricFamily("pylium_flow_ring_flows", "Records in the agent's flow ring.",
                                value=len(ring))
        yield GaugeMetricFamily("pylium_flow_reader_attached",
                                "1 when the agent reads the datapath's events ring buffer.",
                                value=1 if obs.reader is not None else 0)

    def _datapath_counters(self) -> dict[tuple[int, int], tuple[int, int]] | None:
        daemon = self.observer.daemon
        datapath = daemon.components.get("datapath") if daemon is not None else None
        if datapath is None:
            return None
        try:
            raw = _call(datapath, "dump_metrics", "read_metrics")
        except Exception:
            log.exception("reading datapath metrics")
            return None
        if raw is None:
            return None
        out: dict[tuple[int, int], tuple[int, int]] = {}
        if isinstance(raw, list) and all(isinstance(r, dict) for r in raw):
            # Datapath.dump_metrics(): [{"reason", "direction": "ingress"|"egress", ...}]
            for row in raw:
                direction = 1 if str(row["direction"]).lower() == "egress" else 0
                key = (int(row["reason"]), direction)
                packets, nbytes = out.get(key, (0, 0))
                out[key] = (packets + int(row["packets"]), nbytes + int(row["bytes"]))
            return out
        items = raw.items() if isinstance(raw, dict) else ((tuple(r[:2]), tuple(r[2:4]))
                                                            for r in raw)
        for key, value in items:
            reason, direction = (key.reason, key.direction) if hasattr(key, "reason") else key
            if hasattr(value, "packets"):
                value = (value.packets, value.bytes)
            out[(int(reason), int(direction))] = (int(value[0]), int(value[1]))
        return out

    def _datapath_metrics(self, counts) -> Iterator[Metric]:
        drop_count = CounterMetricFamily(
            "pylium_drop_count", "Dropped packets (Cilium: cilium_drop_count_total).",
            labels=["reason", "direction"])
        forward_count = CounterMetricFamily(
            "pylium_forward_count", "Forwarded packets (Cilium: cilium_forward_count_total).",
            labels=["direction"])
        dp = self._datapath_counters()
        drops: dict[tuple[str, str], int] = {}
        forwards: dict[str, int] = {}
        if dp is not None:
            drop_bytes = CounterMetricFamily(
                "pylium_drop_bytes", "Dropped bytes (Cilium: cilium_drop_bytes_total).",
                labels=["reason", "direction"])
            forward_bytes = CounterMetricFamily(
                "pylium_forward_bytes", "Forwarded bytes (Cilium: cilium_forward_bytes_total).",
                labels=["direction"])
            dbytes: dict[tuple[str, str], int] = {}
            fbytes: dict[str, int] = {}
            for (reason, direction), (packets, nbytes) in dp.items():
                d = _direction(direction)
                if reason == 0:
                    forwards[d] = forwards.get(d, 0) + packets
                    fbytes[d] = fbytes.get(d, 0) + nbytes
                else:
                    k = (drop_reason_label(reason), d)
                    drops[k] = drops.get(k, 0) + packets
                    dbytes[k] = dbytes.get(k, 0) + nbytes
            for k, n in sorted(dbytes.items()):
                drop_bytes.add_metric(list(k), n)
            for d, n in sorted(fbytes.items()):
                forward_bytes.add_metric([d], n)
            yield drop_bytes
            yield forward_bytes
        else:  # no datapath counters: what the events showed (drop events, trace events)
            for (kind, verdict, drop, direction), n in counts.items():
                d = _direction(direction)
                if kind == EVENT_DROP:
                    k = (drop_reason_label(drop), d)
                    drops[k] = drops.get(k, 0) + n
                elif verdict == "FORWARDED" and kind == EVENT_TRACE:
                    forwards[d] = forwards.get(d, 0) + n
        for k, n in sorted(drops.items()):
            drop_count.add_metric(list(k), n)
        for d, n in sorted(forwards.items()):
            forward_count.add_metric([d], n)
        yield drop_count
        yield forward_count

    def _component_metrics(self) -> Iterator[Metric]:
        daemon = self.observer.daemon
        if daemon is None:
            return
        comps = daemon.components
        endpoints = comps.get("endpoint")
        if endpoints is not None:
            eps = list(endpoints.list())
            yield GaugeMetricFamily("pylium_endpoint", "Endpoints on this node "
                                    "(Cilium: cilium_endpoint).", value=len(eps))
            states = GaugeMetricFamily("pylium_endpoint_state", "Endpoints by state "
                                       "(Cilium: cilium_endpoint_state).",
                                       labels=["endpoint_state"])
            by_state: dict[str, int] = {}
            for ep in eps:
                by_state[ep.state] = by_state.get(ep.state, 0) + 1
            for state, n in sorted(by_state.items()):
                states.add_metric([state], n)
            yield states
        identities = comps.get("identity")
        if identities is not None:
            count = _count(identities)
            if count is not None:
                yield GaugeMetricFamily("pylium_identity", "Security identities known to "
                                        "this agent (Cilium: cilium_identity).", value=count)
        policy = comps.get("policy")
        if policy is not None:
            repository = getattr(policy, "repository", None)
            count = _count(policy if repository is None else repository, ("policies",))
            if count is not None:
                yield GaugeMetricFamily("pylium_policy", "Policy rules loaded "
                                        "(Cilium: cilium_policy).", value=count)
        datapath = comps.get("datapath")
        if datapath is not None:
            try:
                pressure = _call(datapath, "map_pressure")
            except Exception:
                log.exception("reading map pressure")
                pressure = None
            full = getattr(datapath, "map_full", None)
            if isinstance(full, dict):
                refused = CounterMetricFamily(
                    "pylium_bpf_map_full", "Updates refused because a BPF map was full "
                    "(nothing changed: the previous state stays in force).", labels=["map_name"])
                for name in sorted({"policy", "ipcache", *full}):
                    refused.add_metric([name], full.get(name, 0))
                yield refused
            if pressure:
                fam = GaugeMetricFamily("pylium_bpf_map_pressure", "Fill ratio of BPF maps "
                                        "(Cilium: cilium_bpf_map_pressure).", labels=["map_name"])
                for name, ratio in sorted(pressure.items()):
                    fam.add_metric([name], float(ratio))
                yield fam
        lb = comps.get("lb")
        if lb is not None and callable(getattr(lb, "metric_families", None)):
            yield from lb.metric_families()
        kv = self.kvstore_status
        if kv is not None:
            yield GaugeMetricFamily("pylium_kvstore_healthy", "1 when the KV store answers.",
                                    value=1 if kv.get("healthy") else 0)
        yield GaugeMetricFamily("pylium_agent_uptime_seconds", "Seconds since the agent "
                                "started.", value=round(time.time() - daemon.started_at, 3))


def _count(component: Any, names: tuple[str, ...] = ("count", "list", "rules", "all")
           ) -> int | None:
    for name in names:
        attr = getattr(component, name, None)
        try:
            value = attr() if callable(attr) else attr
        except Exception:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if value is not None and hasattr(value, "__len__"):
            return len(value)
    try:
        return len(component)
    except TypeError:
        return None


def make_registry(observer, registry: CollectorRegistry | None = None
                  ) -> tuple[CollectorRegistry, AgentCollector]:
    """The agent's collector in `registry` (the daemon's, which plugins' collectors share)
    or a new one."""
    registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
    collector = AgentCollector(observer)
    registry.register(collector)
    return registry, collector
