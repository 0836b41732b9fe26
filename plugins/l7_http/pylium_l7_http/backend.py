"""The `http` L7 parser backend: runs pylium's L7 proxy process with the HTTP parser, feeds
it the HTTP policy of local endpoints, and turns its records into flows and metrics.

The proxy process outlives the agent (a `kill -9` of the agent cuts no proxied connection);
`stop()` only stops talking to it. It really stops with plugin option
`stop_proxy_on_exit: true`, or `python -m pylium.l7.proxy stop --state-dir DIR`
(DIR = `status()["state_dir"]`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pylium.api import L7Parser, L7Request, L7Verdict
from pylium.errors import PluginError
from pylium.l7.parser import Grant
from pylium.l7.supervisor import ProxySupervisor, policy_message

from pylium_l7_http.parser import judge

PARSER_SPEC = "pylium_l7_http.parser:HttpParserFactory"
#: how often the snapshot is compared with what the proxy has (endpoints come and go
#: without policy changes)
RESYNC_INTERVAL = 1.0
#: how long an agent that adopted a proxy waits for its endpoints before it may push an
#: empty policy over the one the proxy enforces
ADOPT_GRACE = 30.0
FLOW_FIELDS = ("src_ip", "dst_ip", "sport", "dport", "src_identity", "dst_identity",
               "verdict", "l7", "ep_id", "direction", "is_reply", "proxy_port")


def _version() -> str:
    try:
        return version("pylium-l7-http")
    except PackageNotFoundError:
        return "0"


class HttpMetrics:
    """The metric families, once per registry (an agent restarted in one process, or
    tests, register again on the same registry)."""

    _by_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, registry: Any):
        from prometheus_client import Counter, Gauge, Histogram

        kw = {"registry": registry}
        self.redirects = Gauge("pylium_proxy_redirects",
                               "Policy keys redirected to the L7 proxy", ["protocol"], **kw)
        self.l7_total = Counter("pylium_policy_l7", "L7 requests by what the proxy did",
                                ["rule"], **kw)
        self.requests = Counter("hubble_http_requests",
                                "HTTP requests by method, protocol, status and reporter",
                                ["method", "protocol", "status", "reporter"], **kw)
        self.duration = Histogram("hubble_http_request_duration_seconds",
                                  "HTTP request latency (first response byte)",
                                  ["method", "reporter"], **kw)

    @classmethod
    def of(cls, registry: Any) -> HttpMetrics | None:
        if registry is None:
            return None
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found

    def observe(self, flow: dict[str, Any]) -> None:
        l7 = flow.get("l7", {})
        http = l7.get("http", {})
        reporter = "server" if flow.get("direction") == 0 else "client"
        if l7.get("type") == "REQUEST":
            self.l7_total.labels("received").inc()
            if "error" in flow:
                self.l7_total.labels("parse_errors").inc()
            elif flow.get("verdict") == "DROPPED":
                self.l7_total.labels("denied").inc()
                self.requests.labels(http.get("method", ""), http.get("protocol", ""),
                                     "403", reporter).inc()
            else:
                self.l7_total.labels("forwarded").inc()
        elif l7.get("type") == "RESPONSE" and http.get("code"):
            self.requests.labels(http.get("method", ""), http.get("protocol", ""),
                                 str(http["code"]), reporter).inc()
            if l7.get("latency_ns"):
                self.duration.labels(http.get("method", ""), reporter).observe(
                    l7["latency_ns"] / 1e9)


class L7Http(L7Parser):
    """`l7 parser` capability "http". Options (`plugin_options.http`): `stop_proxy_on_exit`
    (default false), `launcher` (a command prefix for the proxy, e.g. `nsenter ...`)."""

    name = "http"
    protocol = "http"

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.supervisor: ProxySupervisor | None = None
        self.metrics = HttpMetrics.of(getattr(context, "metrics", None))
        self._unsubscribe = None
        self._changed = asyncio.Event()
        self._pusher: asyncio.Task | None = None
        self._revision = 0
        self._last_sent: dict[str, Any] | None = None
        self._hold_until = 0.0
        self.flows_recorded = 0

    # policy trace ------------------------------------------------------------------------
    def judge(self, rules: list[Any], request: L7Request) -> L7Verdict:
        """The proxy's own decision for one request (`pylium policy trace --http-*`):
        `rules` are the grants (`L7Grant`) of the key, or bare `PortRuleHTTP`s."""
        grants = tuple(Grant(rule=getattr(r, "rule", ""), allow_all=r.allow_all,
                             rules=tuple(r.rules or ())) if hasattr(r, "allow_all")
                       else Grant(rule="", rules=(r,)) for r in rules)
        f = request.fields
        verdict = judge(grants, f.get("method", ""), f.get("path", ""), f.get("host", ""),
                        f.get("headers") or {})
        return L7Verdict(verdict.allowed, f"allowed by {verdict.rule}" if verdict.allowed
                         else "no HTTP rule matches (403 Access denied)")

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        ctx = self.context
        if ctx.state_dir is None:
            raise PluginError("the http L7 proxy needs a state directory")
        ports = {d: int(p) for d, p in (ctx.proxy_ports or {}).items()}
        if not ports:
            raise PluginError("no proxy ports for protocol http")
        datapath = getattr(ctx, "datapath", None)
        pin = getattr(datapath, "root", None)
        self.supervisor = ProxySupervisor(
            Path(ctx.state_dir) / "proxy", PARSER_SPEC, ports, _version(),
            on_flow=self._flow, ipcache_pin=str(Path(pin) / "ipcache") if pin else None,
            launcher=self.options.get("launcher") or (), logger=ctx.log)
        how = await self.supervisor.start()
        ctx.log.info("http L7 proxy %s (pid %s, ports %s)", how,
                     self.supervisor.info.get("pid"), ports)
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
        """Send the newest HTTP policy of every local endpoint to the proxy (if it differs
        from the last one sent). Right after adopting a proxy that enforces a policy, an
        agent that has not restored its endpoints yet holds back its empty snapshot (up to
        ADOPT_GRACE): the proxy keeps judging by the last policy rather than denying all."""
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
        if self.metrics is not None:
            self.metrics.redirects.labels(self.protocol).set(
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
        if self.metrics is not None:
            self.metrics.observe(message)
        flows = self.context.flows
        if flows is not None:
            flows.record_l7(**{k: message[k] for k in FLOW_FIELDS if k in message})
            self.flows_recorded += 1

    # health ------------------------------------------------------------------------------
    def served_ports(self) -> set[int]:
        return self.supervisor.served_ports() if self.supervisor is not None else set()

    def status(self) -> dict[str, Any]:
        out = self.supervisor.status() if self.supervisor is not None else {}
        out["flows_recorded"] = self.flows_recorded
        return out
