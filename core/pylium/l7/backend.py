"""`ProxiedParser`: the lifecycle every L7 parser plugin that runs pylium's proxy process
shares (spawn or adopt it through `ProxySupervisor`, push it the policy on every change,
answer `served_ports` honestly — the L7 component watches it —, hand the proxy's flow
records to the flow layer).
The proxy metrics every parser has (`ProxyMetrics`: redirected keys, requests by what the
proxy did) are counted here, labelled by protocol; a plugin adds only its protocol's own
metrics (Hubble's `hubble_http_*`, `hubble_kafka_*`) and the protocol work."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import math
import operator
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, ClassVar

import orjson

from pylium.api import L7Parser
from pylium.errors import PluginError
from pylium.l7.supervisor import ConnSide, FlowBatch, ProxyPool, policy_message

#: how often the snapshot is compared with what the proxy has (endpoints come and go
#: without policy changes)
RESYNC_INTERVAL = 1.0
#: how long an agent that adopted a proxy waits for its endpoints before it may push an
#: empty policy over the one the proxy enforces
ADOPT_GRACE = 30.0
#: flow records of a proxy's batch the agent takes before it offers its CPU to other
#: processes (`yield_cpu`). A batch holds up to FLOW_FLUSH_DELAY's worth of a busy proxy's
#: records (~650 at 65k requests/s), ~0.35 ms of work taken at once; meanwhile the proxy,
#: the workloads and their clients, all waiting on each other, share the other CPUs. On
#: the 2-CPU bench, slices of 128 took the p99 at 10 connections from 0.74-0.81 ms to
#: 0.52-0.70 ms, for ~0.4 us more agent CPU per request (`bench/bench_l7_http.py`).
INTAKE_SLICE = 128
#: offers the CPU to other runnable processes (returns at once when there are none): the
#: agent's flow intake is bulk work that nobody waits for
yield_cpu = os.sched_yield
_REPLY = attrgetter("reply")
_HEAD = attrgetter("head")
FLOW_FIELDS = ("src_ip", "dst_ip", "sport", "dport", "src_identity", "dst_identity",
               "verdict", "l7", "ep_id", "direction", "is_reply", "proxy_port")


class LocalCounter:
    """A counter family counted in a plain dict (label values -> count) and read when the
    registry is collected: a flow costs a dictionary update, not a prometheus-client call
    (a label lookup and a lock per increment). One writer (the agent's loop); a scrape
    from another thread copies the dict in one step, so it shows exact counts."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: Any):
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.counts: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: int = 1) -> None:
        counts = self.counts
        counts[labels] = counts.get(labels, 0) + amount

    def describe(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.counts.items()):
            family.add_metric(labels, value)
        yield family


class LocalHistogram:
    """A histogram family kept like `LocalCounter`: per label values, the count of each
    bucket (`le`, as Prometheus's) and the sum, updated by one bisect and two additions."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: Any, buckets: Sequence[float] | None = None):
        from prometheus_client import Histogram

        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(float(b) for b in (buckets or Histogram.DEFAULT_BUCKETS)
                            if not math.isinf(b))
        #: label values -> [count of each bucket, then of +Inf, then the sum]
        self.data: dict[tuple[str, ...], list[float]] = {}
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        entry = self.entry(labels)
        entry[bisect.bisect_left(self.bounds, value)] += 1
        entry[-1] += value

    def observe_many(self, labels: tuple[str, ...], values: list[float]) -> None:
        """`observe` of each value (numbers, not NaN), in order: the same buckets, and
        the same sum (added one by one); many are counted from the values sorted once."""
        entry = self.entry(labels)
        bounds = self.bounds
        if len(values) <= 2 * len(bounds):  # few: each bisected costs less
            for value in values:
                entry[bisect.bisect_left(bounds, value)] += 1
            entry[-1] = functools.reduce(operator.add, values, entry[-1])
            return
        ordered = sorted(values)
        below = 0
        for i, bound in enumerate(bounds):  # bucket i: bounds[i-1] < value <= bound
            upto = bisect.bisect_right(ordered, bound)
            entry[i] += upto - below
            below = upto
        entry[len(bounds)] += len(ordered) - below
        entry[-1] = functools.reduce(operator.add, values, entry[-1])

    def entry(self, labels: tuple[str, ...]) -> list[float]:
        """The live counts of these label values (as `observe` adds to them: bucket
        `bisect_left(bounds, value)`, then the sum last), for a caller that observes many
        values itself; made empty if new."""
        entry = self.data.get(labels)
        if entry is None:
            entry = self.data[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        return entry

    def describe(self) -> list[Any]:
        from prometheus_client.core import HistogramMetricFamily

        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        names = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for labels, entry in list(self.data.items()):
            entry = list(entry)
            cumulative, buckets = 0, []
            for name, count in zip(names, entry[:-1], strict=True):
                cumulative += count
                buckets.append((name, cumulative))
            family.add_metric(labels, buckets, entry[-1])
        yield family


class RegistryMetrics:
    """A plugin's metric families, registered once per Prometheus registry (an agent
    restarted in one process, or tests, register again on the same registry).
    Subclasses define the families in `__init__(self, registry)`."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._by_registry = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, registry: Any) -> Any:
        """This class's families on `registry` (None: no registry, no metrics)."""
        if registry is None:
            return None
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found


class ProxyMetrics(RegistryMetrics):
    """The L7 proxy families of every parser, labelled by its protocol (Cilium's
    `cilium_proxy_redirects` and `cilium_policy_l7_total`)."""

    def __init__(self, registry: Any):
        from prometheus_client import Gauge

        self.redirects = Gauge("pylium_proxy_redirects",
                               "Policy keys redirected to an L7 proxy, by protocol",
                               ["protocol"], registry=registry)
        #: counted per flow record: a plain dict (`LocalCounter`), read when scraped
        self.l7_total = LocalCounter("pylium_policy_l7", "L7 requests by what the proxy did",
                                     ["rule", "protocol"], registry)

    def observe(self, protocol: str, flow: dict[str, Any]) -> None:
        """One proxy flow record: a request is `received`, then `parse_errors` (the proxy
        could not judge it), `denied` or `forwarded`; responses are not counted."""
        if flow.get("l7", {}).get("type") != "REQUEST":
            return
        if "error" in flow:
            rule = "parse_errors"
        elif flow.get("verdict") == "DROPPED":
            rule = "denied"
        else:
            rule = "forwarded"
        inc = self.l7_total.inc
        inc(("received", protocol))
        inc((rule, protocol))


class ProxiedParser(L7Parser):
    """Options (`plugin_options.<name>`): `stop_proxy_on_exit` (default false), `launcher`
    (a command prefix for the proxy, e.g. `nsenter ...`), `workers` (proxy processes
    sharing the ports, default 1: Python uses one core per process)."""

    #: `module:Factory` of the parser the proxy process runs
    parser_spec: str = ""

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.supervisor: ProxyPool | None = None
        self._unsubscribe = None
        self._changed = asyncio.Event()
        self._pusher: asyncio.Task | None = None
        self._revision = 0
        self._last_sent: dict[str, Any] | None = None
        self._hold_until = 0.0
        self.flows_recorded = 0
        self.proxy_metrics = ProxyMetrics.of(getattr(context, "metrics", None))
        #: per proxy (`ProxySupervisor`): its connection sides, the enrichment generation
        #: their flow heads are made for, and how many could not be (`_heads`)
        self._made_heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # what a plugin provides ---------------------------------------------------------------
    def version(self) -> str:
        """Proxies of another version are replaced rather than adopted."""
        return "0"

    def observe(self, flow: dict[str, Any]) -> None:
        """The protocol's own metrics of one flow record (before it goes to the flow
        layer; the proxy metrics are counted already)."""

    def observe_fast(self, sides: list[ConnSide], members: list[bytes],
                     prefixes: list[bytes] | None = None) -> None:
        """`observe` of a batch's fast-path records (FORWARDED, no error), as the proxy
        sent them: the connection side and the members of its JSON object each (after its
        `prefixes` entry, if given: `pylium.l7.parser.FastRecord`). This decodes each
        whole; a protocol whose metrics need less overrides it."""
        observe = self.observe
        if prefixes is not None:
            members = list(map(operator.add, prefixes, members))
        for side, fields in zip(sides, members, strict=True):
            flow = side.base.copy()
            flow.update(orjson.loads(b"{%b}" % fields))
            observe(flow)

    # lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        ctx = self.context
        if ctx.state_dir is None:
            raise PluginError(f"the {self.protocol} L7 proxy needs a state directory")
        ports = {d: int(p) for d, p in (ctx.proxy_ports or {}).items()}
        if not ports:
            raise PluginError(f"no proxy ports for protocol {self.protocol}")
        pin = getattr(getattr(ctx, "datapath", None), "root", None)
        try:
            workers = int(self.options.get("workers", 1))
        except (TypeError, ValueError):
            raise PluginError(f"{self.protocol}: workers must be a number, not "
                              f"{self.options.get('workers')!r}") from None
        self.supervisor = ProxyPool(
            Path(ctx.state_dir) / "proxy", self.parser_spec, ports, self.version(),
            workers=workers, on_flow=self._flow, on_flows=self._flows, on_batch=self._batch,
            ipcache_pin=str(Path(pin) / "ipcache") if pin else None,
            launcher=self.options.get("launcher") or (), logger=ctx.log)
        how = await self.supervisor.start()
        ctx.log.info("%s L7 proxy %s (pid %s, ports %s)", self.protocol, how,
                     ",".join(map(str, self.supervisor.info["pids"])), ports)
        self._hold_until = time.monotonic() + ADOPT_GRACE
        await self.push_policy()
        if ctx.policy is not None:  # policy changes may be announced from another thread
            loop = asyncio.get_running_loop()
            self._unsubscribe = ctx.policy.subscribe(
                lambda: loop.call_soon_threadsafe(self._changed.set))
        self._pusher = asyncio.get_running_loop().create_task(self._push_loop())

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pusher
            self._pusher = None
        if self.supervisor is not None:
            if self.options.get("stop_proxy_on_exit"):
                await self.supervisor.shutdown()
            else:
                await self.supervisor.close()

    async def _push_loop(self) -> None:
        """Push on every policy change, and look again every second: endpoints that
        appear (restored after an agent restart, created) change the snapshot without a
        policy change. An unchanged snapshot is not sent again."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), RESYNC_INTERVAL)
            self._changed.clear()
            await self.push_policy()

    async def push_policy(self, force: bool = False) -> dict[str, Any] | None:
        """Send the newest policy of this protocol for every local endpoint to the proxy
        (if it differs from the last one sent). Right after adopting a proxy that enforces
        a policy, an agent that has not restored its endpoints yet holds back its empty
        snapshot (up to ADOPT_GRACE): the proxy keeps judging by the last policy rather
        than denying all."""
        ctx = self.context
        snapshot = ctx.policy.snapshot() if ctx.policy is not None else []
        message = policy_message(snapshot, self.protocol, self._ipcache(), 0)
        if message == self._last_sent and not force:
            return None
        if (not message["endpoints"] and self.supervisor.how == "adopted"
                and self._last_sent is None and time.monotonic() < self._hold_until
                and (self.supervisor.info.get("redirects") or 0) > 0):
            return None
        self._last_sent = dict(message)
        self._revision += 1
        message["revision"] = self._revision
        if self.proxy_metrics is not None:
            self.proxy_metrics.redirects.labels(self.protocol).set(
                sum(len(ep["entries"]) for ep in message["endpoints"]))
        ack = await self.supervisor.push(message)
        if ack is None:
            self._last_sent = None  # not delivered: send again next time
        return ack

    def _ipcache(self) -> list[tuple[str, int]]:
        datapath = getattr(self.context, "datapath", None)
        if datapath is None or not hasattr(datapath, "dump_ipcache"):
            return []
        try:
            return [(row["cidr"], row["identity"]) for row in datapath.dump_ipcache()]
        except Exception as exc:  # the proxy falls back to the pinned map / world
            self.context.log.warning("ipcache dump for the L7 proxy failed: %s", exc)
            return []

    def _flow(self, message: dict[str, Any]) -> None:
        if self.proxy_metrics is not None:
            self.proxy_metrics.observe(self.protocol, message)
        self.observe(message)
        flows = self.context.flows
        if flows is not None:
            flows.record_l7(**{k: message[k] for k in FLOW_FIELDS if k in message})
            self.flows_recorded += 1

    def _flows(self, messages: list[dict[str, Any]]) -> None:
        """A proxy batch's records, as `_flow` each, into the flow layer at once
        (`record_l7_many`: one lock and one ring append) where it can."""
        metrics, observe, protocol = self.proxy_metrics, self.observe, self.protocol
        for message in messages:
            if metrics is not None:
                metrics.observe(protocol, message)
            observe(message)
        flows = self.context.flows
        if flows is None:
            return
        many = getattr(flows, "record_l7_many", None)
        if many is None:
            for message in messages:
                flows.record_l7(**{k: message[k] for k in FLOW_FIELDS if k in message})
            self.flows_recorded += len(messages)
            return
        skipped = many(messages) or 0
        if skipped:
            self.context.log.error("%d L7 flow records of the %s proxy not recorded "
                                   "(malformed)", skipped, protocol)
        self.flows_recorded += len(messages) - skipped

    def _batch(self, batch: FlowBatch) -> None:
        """A protocol 4 or 5 batch (`FlowBatch`): its fast-path records counted and recorded
        as they came — the connection side's flow head made once (`l7_head`), the
        record's JSON decoded only when someone reads the flow (`record_l7_raw`) —, any
        other decoded and taken as `_flows` takes it, in order; INTAKE_SLICE records at a
        time, the CPU offered to other processes between slices (`yield_cpu`) unless more
        of the proxy's lines wait (`ProxySupervisor.backlogged`: on a busy machine a
        yielding agent falls behind, and the proxy's buffer has a bound)."""
        flows = self.context.flows
        if flows is None or not hasattr(flows, "record_l7_raw"):
            self._flows(batch.expand())
            return
        heads_made = self._heads(flows, batch)
        sides = list(map(batch.sides.get, batch.cs))
        if len(sides) <= INTAKE_SLICE:
            self._take(flows, batch, sides, 0, heads_made)
            return
        backlogged = batch.owner.backlogged
        for lo in range(0, len(sides), INTAKE_SLICE):
            if lo and not backlogged():  # (behind the proxy: its buffer must not fill)
                yield_cpu()
            self._take(flows, batch, sides[lo:lo + INTAKE_SLICE], lo, heads_made)

    def _take(self, flows: Any, batch: FlowBatch, sides: list[ConnSide | None], lo: int,
              heads_made: bool) -> None:
        """The batch's records from `lo` on, one per side of `sides` (None: not a fast
        path's, or an unknown connection's)."""
        hi = lo + len(sides)
        if heads_made and None not in sides:  # all fast: no Python code per record
            whole = hi - lo == len(batch.records)
            prefixes = batch.prefixes
            self._fast(flows, sides, batch.records if whole else batch.records[lo:hi],
                       prefixes if whole or prefixes is None else prefixes[lo:hi])
            return
        records = batch.wholes(lo, hi)
        # runs of fast records and of whole ones, each taken at once, in order
        run_sides: list[ConnSide] = []
        run: list[bytes] = []
        wholes: list[dict[str, Any]] = []
        for i, (side, c, fields) in enumerate(zip(sides, batch.cs[lo:hi], records, strict=True),
                                              lo):
            if side is not None and side.head is not None:
                if wholes:
                    self._flows(wholes)
                    wholes = []
                run_sides.append(side)
                run.append(fields)
                continue
            if run:
                self._fast(flows, run_sides, run)
                run_sides, run = [], []
            if side is None:  # not a fast path's record (or an unknown connection's)
                whole = batch.whole(c, fields, batch.seq + i)
                if whole is not None:
                    wholes.append(whole)
            # else its connection's part is not a flow's: not recorded (`_heads`)
        if run:
            self._fast(flows, run_sides, run)
        if wholes:
            self._flows(wholes)

    def _heads(self, flows: Any, batch: FlowBatch) -> bool:
        """Every connection side the batch's proxy announced has its flow head for the
        flow layer's current enrichment (`ConnSide.head`): all made again when that
        changed (or the proxy's connections are new), else only those the batch
        announced. False if one cannot be made (its connection's part is not a flow's:
        logged once, its records not recorded, as `record_l7_many` skips what it
        refuses)."""
        gen = flows.l7_generation
        # taken out until all are made: an exception leaves the next batch to make all
        made = self._made_heads.pop(batch.owner, None)
        if made is not None and made[0] is batch.sides and made[1] == gen:
            todo, bad = batch.fresh, made[2]
        else:
            todo, bad = list(batch.sides.values()), 0
        for side in todo:
            try:
                side.head = flows.l7_head(side.base)
            except ValueError as exc:
                side.head = None
                bad += 1
                self.context.log.error("the L7 flow records of a %s proxy connection "
                                       "are not recorded: %s", self.protocol, exc)
        self._made_heads[batch.owner] = (batch.sides, gen, bad)
        return not bad

    def _fast(self, flows: Any, sides: list[ConnSide], members: list[bytes],
              prefixes: list[bytes] | None = None) -> None:
        """Fast-path records (each `prefixes`' entry + its `members`' one, if given):
        requests count as received and forwarded, the protocol's metrics, then the
        flows."""
        requests = len(sides) - sum(map(_REPLY, sides))
        if requests and self.proxy_metrics is not None:
            inc = self.proxy_metrics.l7_total.inc
            inc(("received", self.protocol), requests)
            inc(("forwarded", self.protocol), requests)
        self.observe_fast(sides, members, prefixes)
        flows.record_l7_raw(list(map(_HEAD, sides)), members, prefixes)
        self.flows_recorded += len(members)

    def teardown(self) -> None:
        """Deselected: the proxy an earlier run left (it outlives agents) stops for good."""
        from pylium.l7.proxy import stop_running

        if self.context.state_dir is not None and stop_running(
                Path(self.context.state_dir) / "proxy"):
            self.context.log.info("%s L7 proxy stopped (parser deselected)", self.protocol)

    # health -------------------------------------------------------------------------------
    def served_ports(self) -> set[int]:
        return self.supervisor.served_ports() if self.supervisor is not None else set()

    def status(self) -> dict[str, Any]:
        out = self.supervisor.status() if self.supervisor is not None else {}
        out["flows_recorded"] = self.flows_recorded
        return out
