"""The `http` L7 parser backend: runs pylium's L7 proxy process with the HTTP parser, feeds
it the HTTP policy of local endpoints, and turns its records into flows and metrics.

The proxy process outlives the agent (a `kill -9` of the agent cuts no proxied connection);
`stop()` only stops talking to it. It really stops with plugin option
`stop_proxy_on_exit: true`, or `python -m pylium.l7.proxy stop --state-dir DIR`
(DIR = `status()["state_dir"]`)."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from itertools import compress, repeat
from operator import add, attrgetter, eq, getitem, is_, itemgetter, ne, truediv
from typing import Any

import orjson
from pylium.api import L7Request, L7Verdict
from pylium.l7.backend import LocalCounter, LocalHistogram, ProxiedParser, RegistryMetrics
from pylium.l7.parser import Grant
from pylium.l7.supervisor import RECORD_SEP

from pylium_l7_http.parser import judge

PARSER_SPEC = "pylium_l7_http.parser:HttpParserFactory"
#: distinct response parts before the headers remembered (method, URL, code: a client
#: that never repeats a URL gains nothing; the memory stays bounded)
LABELS_CACHE = 4096
#: where a fast-path record's headers begin (what `_learn` reads lies before)
HEADERS = b',"headers":['
#: what precedes a fast-path response's latency (the last member of its l7)
LATENCY = b',"latency_ns":'
#: a fast-path response's end, its latency's digits (`_observe_run`: records joined by
#: RECORD_END, each's last ENDS bytes, so up to 15 digits; longer ones go one by one).
#: RECORD_END is the control protocol's record separator, which no record holds
RECORD_END = RECORD_SEP
ENDS = slice(-30, None)
LATENCY_AT_END = re.compile(re.escape(LATENCY) + rb"([0-9]+)\}" + RECORD_END)
#: Hubble's reporter label by whether the record's direction is not ingress
REPORTERS = ("server", "client")
#: the fewest responses taken a run at once (a run costs a few microseconds more, once)
RUN_MIN = 16
#: the memo of a side that has none yet: no record begins with no prefix
NO_MEMO = ((), 0, None, None)
_REPLY = attrgetter("reply")
_MEMO = attrgetter("memo")
_DIRECTION = attrgetter("direction")
_PREFIX, _END, _COUNT_KEY, _DURATION_KEY = map(itemgetter, range(4))
#: a response's labels (`_learn`): its count's keys, its latency's keys (by reporter)
_COUNT_KEYS, _DURATION_KEYS = itemgetter(0), itemgetter(1)
DIGITS = b"0123456789"


def _tally(keys: list) -> Iterable[tuple[Any, int]]:
    """How often each key occurs, in the order they first occur (mostly one key)."""
    if keys.count(keys[0]) == len(keys):
        return ((keys[0], len(keys)),)
    return Counter(keys).items()


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
        #: a fast-path response's part before its headers -> its labels (`_learn`)
        self._labels: dict[bytes, tuple | bool] = {}
        #: a fast-path response's prefix (up to its latency) -> its labels, False if it is
        #: not laid out so (`_learn_prefix`)
        self._prefix_keys: dict[bytes, tuple | bool] = {}

    def observe(self, flow: dict[str, Any]) -> None:
        """One flow record: a denied request counts as a 403, a response by its code
        and its latency."""
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


    def observe_fast(self, sides: list[Any], members: list[bytes],
                     prefixes: list[bytes] | None = None) -> None:
        """`observe` of fast-path records (`ProxiedParser.observe_fast`) without decoding
        them: a forwarded request counts nothing; a response's labels are decoded once
        per distinct part before its headers (`_learn`), its latency read off its end.
        Responses in two parts (`prefixes`: the parser's response prefix, then the
        latency) are counted by their prefix's labels, all at once (`_observe_prefixed`).
        Otherwise those whose side's last response had the same part (`ConnSide.memo`,
        the steady state of a connection) are counted a run at once, with no Python code
        per record (`_observe_run`); the others one by one (`_observe_each`), in order."""
        replies = list(map(_REPLY, sides))
        responses = list(compress(members, replies))
        if not responses:
            return
        sides = list(compress(sides, replies))
        if prefixes is not None:
            prefixes = list(compress(prefixes, replies))
            if self._observe_prefixed(sides, prefixes, responses):
                return
            responses = list(map(add, prefixes, responses))  # as they would have come
        if len(responses) < RUN_MIN:
            self._observe_each(sides, responses)
            return
        memos = list(map(_MEMO, sides))
        if None in memos:  # sides not seen yet: none of theirs matches
            memos = [NO_MEMO if memo is None else memo for memo in memos]
        matches = list(map(bytes.startswith, responses, map(_PREFIX, memos)))
        start, n = 0, len(responses)
        while start < n:
            try:
                end = matches.index(False, start)
            except ValueError:
                end = n
            if end - start >= RUN_MIN:
                self._observe_run(sides[start:end], responses[start:end], memos[start:end])
            elif end > start:
                self._observe_each(sides[start:end], responses[start:end])
            if end < n:
                self._observe_each(sides[end:end + 1], responses[end:end + 1])
            start = end + 1

    def _observe_run(self, sides: list[Any], responses: list[bytes],
                     memos: list[tuple]) -> None:
        """Responses that each begin with their side's memo's part (so have its labels),
        counted as `_observe_each` counts them, with no Python code per record: each
        one's latency found by one regex over their ends, counts and histograms added
        per key (`LocalHistogram.observe_many`: the same buckets and sum). If a latency
        is not where and how the fast path writes it, the run is taken one by one."""
        # a match ends a record: `RECORD_END` ends each, and no record holds it
        digits = LATENCY_AT_END.findall(RECORD_END.join(map(getitem, responses,
                                                            repeat(ENDS))) + RECORD_END)
        if len(digits) != len(responses):
            self._observe_each(sides, responses)
            return
        try:  # ints all at once (JSON: without leading zeros)
            latencies = orjson.loads(b"[%b]" % b",".join(digits))
        except ValueError:
            latencies = list(map(int, digits))
        self._count(list(map(_COUNT_KEY, memos)), list(map(_DURATION_KEY, memos)),
                    latencies)

    def _observe_prefixed(self, sides: list[Any], prefixes: list[bytes],
                          rests: list[bytes]) -> bool:
        """Responses in two parts, counted as `_observe_each` counts them: each prefix's
        labels learnt once (`_prefix_keys`), the latencies (each rest is one, then "}")
        read at once. False, nothing counted, if a prefix is not the fast path's response
        up to its latency, has no status code, or a rest is not a latency."""
        entries = list(map(self._prefix_keys.get, prefixes))
        if None in entries:
            for prefix in set(compress(prefixes, map(is_, entries, repeat(None)))):
                self._learn_prefix(prefix)
            entries = list(map(self._prefix_keys.get, prefixes))
        if None in entries or False in entries or () in entries:  # (None: the cache was
            return False                                           # cleared meanwhile)
        joined = b",".join(rests)
        if joined.translate(None, DIGITS) != b"},".join(repeat(b"", len(rests))) + b"}":
            return False
        try:  # ints all at once (JSON: no empty value, no leading zeros)
            latencies = orjson.loads(b"[%b]" % joined.replace(b"}", b""))
        except ValueError:
            return False
        # reporter "server" for ingress (as `_observe_each`: direction != 0 is a client)
        clients = list(map(ne, map(_DIRECTION, sides), repeat(0)))
        self._count(list(map(getitem, map(_COUNT_KEYS, entries), clients)),
                    list(map(getitem, map(_DURATION_KEYS, entries), clients)), latencies)
        return True

    def _learn_prefix(self, prefix: bytes) -> None:
        """`_prefix_keys` of a response prefix: its part before the headers' labels
        (`_learn`), if it ends where the latency starts; else False."""
        end = prefix.find(HEADERS)
        keys: tuple | bool = False
        if end > 0 and prefix.endswith(LATENCY):
            part = prefix[:end]
            keys = self._labels.get(part)  # (as `_observe_each` finds a part's labels)
            if keys is None:
                keys = self._learn(part)
        if len(self._prefix_keys) >= LABELS_CACHE:
            self._prefix_keys.clear()
        self._prefix_keys[prefix] = keys

    def _count(self, count_keys: list[tuple], duration_keys: list[tuple],
               latencies: list[int]) -> None:
        """Responses counted by their count keys, their latencies (ns; 0: not observed,
        as `observe`) added to the histogram by their duration keys, in order."""
        counts = self.requests.counts
        for key, n in _tally(count_keys):
            counts[key] = counts.get(key, 0) + n
        if 0 in latencies:  # counted, not observed (as `observe`)
            keys = list(compress(duration_keys, latencies))
            latencies = list(compress(latencies, latencies))
            if not latencies:
                return
        else:
            keys = duration_keys
        seconds = list(map(truediv, latencies, repeat(1e9)))
        observe_many = self.duration.observe_many
        for key, n in _tally(keys):
            observe_many(key, seconds if n == len(keys)
                         else list(compress(seconds, map(eq, keys, repeat(key)))))

    def _observe_each(self, sides: list[Any], responses: list[bytes]) -> None:
        """`observe_fast` of responses one by one: the side's memo (its last response's
        part up to its headers, where they start, its count's and latency's keys) made
        again when the response's part differs."""
        counts = self.requests.counts
        labels_of = self._labels
        bounds, entries, entry_of = self.duration.bounds, self.duration.data, self.duration.entry
        for side, fields in zip(sides, responses, strict=True):
            memo = side.memo
            if memo is None or not fields.startswith(memo[0]):
                end = fields.find(HEADERS)
                part = fields[:end]
                keys = labels_of.get(part)
                if keys is None:
                    keys = self._learn(part) if end > 0 else False
                if not keys:
                    if keys == ():  # no status code: not counted (as `observe`)
                        continue
                    self._observe_whole(side, fields)  # not the fast path's layout
                    continue
                client = side.direction != 0  # reporter "server" for ingress
                memo = side.memo = (fields[:end + len(HEADERS)], end, keys[0][client],
                                    keys[1][client])
            at = fields.rfind(LATENCY, memo[1])
            try:
                latency = int(fields[at + 14:-1]) if at > 0 and fields[-1] == 125 else None
            except ValueError:  # (125: "}", the end of l7 and of the record)
                latency = None
            if latency is None:
                self._observe_whole(side, fields)
                continue
            key = memo[2]
            counts[key] = counts.get(key, 0) + 1
            if latency:  # `LocalHistogram.observe`, inline
                seconds = latency / 1e9
                entry = entries.get(memo[3]) or entry_of(memo[3])
                entry[bisect_left(bounds, seconds)] += 1
                entry[-1] += seconds

    def _observe_whole(self, side: Any, fields: bytes) -> None:
        """`observe` of a record decoded whole."""
        flow = side.base.copy()
        flow.update(orjson.loads(b"{%b}" % fields))
        self.observe(flow)

    def _learn(self, part: bytes) -> tuple | bool:
        """What a fast-path response's part before its headers gives: the keys of its
        count and of its latency, each per reporter (server, client); () for no status;
        False if that part is not `"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":
        {...` with the method, protocol and code."""
        try:
            record = orjson.loads(b"{%b}}}" % part)
            l7 = record["l7"]
            http = l7["http"]
            # what `observe` reads must all be before the headers (after them it could
            # differ from record to record)
            ok = (record.get("verdict") == "FORWARDED" and l7.get("type") == "RESPONSE"
                  and len(l7) == 2 and "error" not in record
                  and {"method", "protocol", "code"} <= http.keys())
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            keys: tuple | bool = False
        elif not http["code"]:
            keys = ()
        else:
            method, protocol, code = http["method"], http["protocol"], str(http["code"])
            keys = (tuple((method, protocol, code, reporter) for reporter in REPORTERS),
                    tuple((method, reporter) for reporter in REPORTERS))
        if len(self._labels) >= LABELS_CACHE:
            self._labels.clear()
        self._labels[part] = keys
        return keys


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

    def observe_fast(self, sides: list[Any], members: list[bytes],
                     prefixes: list[bytes] | None = None) -> None:
        if self.metrics is not None:
            self.metrics.observe_fast(sides, members, prefixes)

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
