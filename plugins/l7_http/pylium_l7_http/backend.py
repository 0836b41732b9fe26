"""The `http` L7 parser backend: runs pylium's L7 proxy process with the HTTP parser, feeds
it the HTTP policy of local endpoints, and turns its records into flows and metrics.

The proxy process outlives the agent (a `kill -9` of the agent cuts no proxied connection);
`stop()` only stops talking to it. It really stops with plugin option
`stop_proxy_on_exit: true`, or `python -m pylium.l7.proxy stop --state-dir DIR`
(DIR = `status()["state_dir"]`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pylium.api import L7Request, L7Verdict
from pylium.l7.backend import LocalCounter, LocalHistogram, ProxiedParser, RegistryMetrics
from pylium.l7.parser import Grant

from pylium_l7_http.parser import judge

PARSER_SPEC = "pylium_l7_http.parser:HttpParserFactory"


def _version() -> str:
    try:
        return version("pylium-l7-http")
    except PackageNotFoundError:
        return "0"


class HttpMetrics(RegistryMetrics):
    """Hubble's HTTP metric families, once per registry (an agent restarted in one process,
    or tests, register again on the same registry); the proxy metrics are the core's
    (`pylium.l7.backend.ProxyMetrics`). Counted in plain dicts per flow record
    (`LocalCounter`, `LocalHistogram`) and read when scraped."""

    def __init__(self, registry: Any):
        self.requests = LocalCounter("hubble_http_requests",
                                     "HTTP requests by method, protocol, status and reporter",
                                     ["method", "protocol", "status", "reporter"], registry)
        self.duration = LocalHistogram("hubble_http_request_duration_seconds",
                                       "HTTP request latency (first response byte)",
                                       ["method", "reporter"], registry)

    def observe(self, flow: dict[str, Any]) -> None:
        l7 = flow.get("l7", {})
        http = l7.get("http", {})
        reporter = "server" if flow.get("direction") == 0 else "client"
        if l7.get("type") == "REQUEST":
            if "error" not in flow and flow.get("verdict") == "DROPPED":
                self.requests.inc((http.get("method", ""), http.get("protocol", ""), "403",
                                   reporter))
        elif l7.get("type") == "RESPONSE" and http.get("code"):
            method = http.get("method", "")
            self.requests.inc((method, http.get("protocol", ""), str(http["code"]), reporter))
            if l7.get("latency_ns"):
                self.duration.observe((method, reporter), l7["latency_ns"] / 1e9)


class L7Http(ProxiedParser):
    """`l7 parser` capability "http": the core's proxy lifecycle (`ProxiedParser`: spawn or
    adopt, policy pushes, served ports, flows) with the HTTP parser and Hubble's HTTP
    metrics. Options (`plugin_options.http`): `stop_proxy_on_exit` (default false),
    `launcher` (a command prefix for the proxy, e.g. `nsenter ...`)."""

    name = "http"
    protocol = "http"
    parser_spec = PARSER_SPEC

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        super().__init__(context, options)
        self.metrics = HttpMetrics.of(getattr(context, "metrics", None))

    def version(self) -> str:
        return _version()

    def observe(self, flow: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.observe(flow)

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
