"""Flow filters, evaluated in the agent (the CLI only passes them on as query parameters).

Hubble's semantics: values of one filter are OR-ed, different filters are AND-ed; `--pod`,
`--label`, `--identity`, `--ip` and `--port` match either side, `--from-*`/`--to-*` one side.
Lost-event records always pass (a loss is never filtered away)."""

from __future__ import annotations

import calendar
import ipaddress
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from pylium.errors import UserError
from pylium.flow.model import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    VERDICTS,
    Flow,
    LostEvent,
    Peer,
    ServiceRef,
)

Predicate = Callable[[Flow], bool]

#: query parameter → how many values it takes (list ones repeat: ?verdict=A&verdict=B)
LIST_PARAMS = ("verdict", "pod", "from_pod", "to_pod", "label", "from_label", "to_label",
               "service", "from_service", "to_service",
               "identity", "from_identity", "to_identity", "ip", "from_ip", "to_ip", "port",
               "from_port", "to_port", "protocol", "http_method", "http_path",
               "http_status", "traffic_direction", "node_name")
SCALAR_PARAMS = ("since", "until", "last", "first", "follow")
PROTOCOLS = {"tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP, "icmpv4": PROTO_ICMP}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000, "d": 86_400_000_000_000}


def parse_time(text: str, field: str, now_ns: int | None = None) -> int:
    """`--since`/`--until`: a Go-style duration ago (`90s`, `5m`, `1h30m`) or RFC 3339."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    text = text.strip()
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNIT_NS[m.group(2)])
        pos = m.end()
    if pos and pos == len(text):
        return now_ns - total
    try:
        base, frac, offset = _split_rfc3339(text)
        secs = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) - offset
    except ValueError:
        raise UserError(f"{field}: {text!r} is neither a duration (e.g. 5m, 1h30m) nor an "
                        "RFC 3339 time (e.g. 2026-11-22T03:04:05Z)") from None
    return secs * 1_000_000_000 + frac


def _split_rfc3339(text: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        raise ValueError(text)
    frac = int((m.group(2) or "0").ljust(9, "0"))
    tz = m.group(3)
    offset = 0 if tz == "Z" else (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return m.group(1), frac, offset


def _pod_matcher(spec: str) -> Callable[[Peer], bool]:
    """`[ns/]name-prefix`; `ns/` alone matches the whole namespace; no `ns/`: any namespace."""
    if "/" in spec:
        ns, _, prefix = spec.partition("/")
        return lambda p: bool(p.namespace) and p.namespace == ns and \
            p.pod_name.startswith(prefix)
    return lambda p: bool(p.pod_name) and p.pod_name.startswith(spec)


def _service_matcher(spec: str) -> Callable[[ServiceRef | None], bool]:
    """`[ns/]name-prefix` on the service a translated flow went through (as pods match)."""
    if "/" in spec:
        ns, _, prefix = spec.partition("/")
        return lambda s: s is not None and s.namespace == ns and s.name.startswith(prefix)
    return lambda s: s is not None and s.name.startswith(spec)


def _label_matcher(selector: str) -> Callable[[Peer], bool]:
    """Comma-separated `key=value`, `key!=value`, `key`, `!key`; a key matches with or
    without its source prefix (`org=empire` matches `k8s:org=empire`)."""
    terms = []
    for raw in selector.split(","):
        term = raw.strip()
        if not term:
            raise UserError(f"label: empty term in selector {selector!r}")
        if "!=" in term:
            k, v = term.split("!=", 1)
            terms.append((k.strip(), v.strip(), "ne"))
        elif "=" in term:
            k, v = term.split("=", 1)
            terms.append((k.strip().rstrip("="), v.strip(), "eq"))
        elif term.startswith("!"):
            terms.append((term[1:].strip(), None, "absent"))
        else:
            terms.append((term, None, "present"))

    def values(peer: Peer, key: str) -> list[str]:
        out = []
        for label in peer.labels:
            k, _, v = label.partition("=")
            if k == key or k.split(":", 1)[-1] == key:
                out.append(v)
        return out

    def match(peer: Peer) -> bool:
        for key, value, op in terms:
            vals = values(peer, key)
            if op == "eq" and value not in vals:
                return False
            if op == "ne" and value in vals:
                return False
            if op == "present" and not vals:
                return False
            if op == "absent" and vals:
                return False
        return True

    return match


def _ip_matcher(spec: str, field: str) -> Callable[[str], bool]:
    try:
        if "/" in spec:
            net = ipaddress.ip_network(spec, strict=False)
            return lambda ip: ipaddress.ip_address(ip) in net
        exact = str(ipaddress.ip_address(spec))
    except ValueError:
        raise UserError(f"{field}: {spec!r} is not an IP address or CIDR") from None
    return lambda ip: ip == exact


_HTTP_STATUS = re.compile(r"^(\d{3}|\d{1,2}\+)$")


def http_status_matcher(specs: Sequence[str]) -> Callable[[Flow], bool]:
    """Hubble's `--http-status`: an exact code ("404") or a prefix ("5+", "40+"); matches
    L7 responses only (requests carry no code)."""
    exact, prefixes = set(), []
    for spec in specs:
        spec = spec.strip()
        if not _HTTP_STATUS.match(spec):
            raise UserError(f"http_status: {spec!r} is not a status code (404) or a prefix "
                            "(5+, 40+)")
        if spec.endswith("+"):
            prefixes.append(spec[:-1])
        else:
            exact.add(int(spec))

    def match(f: Flow) -> bool:
        l7 = f.l7  # read once: an `L7Flow` decodes it per read
        code = l7.get("http", {}).get("code") if l7 else None
        if not code:
            return False
        return int(code) in exact or any(str(code).startswith(p) for p in prefixes)

    return match


def _int(value: str, field: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{field}: {value!r} is not a number") from None
    if not lo <= n <= hi:
        raise UserError(f"{field}: {n} is out of range {lo}..{hi}")
    return n


def _any(preds: list[Callable[[Any], bool]]) -> Callable[[Any], bool]:
    if len(preds) == 1:
        return preds[0]
    return lambda x: any(p(x) for p in preds)


@attrs.frozen
class FlowQuery:
    """A parsed `observe` request."""

    predicates: tuple[Predicate, ...] = ()
    since_ns: int | None = None
    until_ns: int | None = None
    last: int | None = None
    first: int | None = None
    follow: bool = False

    def matches(self, record: Flow | LostEvent) -> bool:
        if type(record) is LostEvent:
            return True
        if self.since_ns is not None and record.time_ns < self.since_ns:
            return False
        if self.until_ns is not None and record.time_ns > self.until_ns:
            return False
        for pred in self.predicates:
            if not pred(record):
                return False
        return True

    def select(self, records: Sequence[Flow | LostEvent]) -> list[Flow | LostEvent]:
        """The matching records, limited by `first`/`last` (flows count; losses ride along)."""
        matched = [r for r in records if self.matches(r)]
        if self.first is not None:
            out, n = [], 0
            for r in matched:
                if type(r) is Flow:
                    if n >= self.first:
                        break
                    n += 1
                out.append(r)
            return out
        if self.last is not None:
            out, n = [], 0
            for r in reversed(matched):
                if type(r) is Flow:
                    if n >= self.last:
                        break
                    n += 1
                out.append(r)
            out.reverse()
            return out
        return matched


def parse_query(params: Mapping[str, Sequence[str]], default_last: int | None = 20) -> FlowQuery:
    """Build a query from multi-valued parameters ({name: [values]}); unknown names are
    refused so a typo never silently widens the result."""
    unknown = sorted(set(params) - set(LIST_PARAMS) - set(SCALAR_PARAMS))
    if unknown:
        raise UserError(f"{unknown[0]}: unknown flow filter (known: "
                        f"{', '.join(LIST_PARAMS + SCALAR_PARAMS)})")

    def vals(name: str) -> list[str]:
        return [v for v in params.get(name, ()) if v != ""]

    def scalar(name: str) -> str | None:
        got = vals(name)
        return got[-1] if got else None

    preds: list[Predicate] = []

    if vals("verdict"):
        wanted = set()
        for v in vals("verdict"):
            up = v.upper()
            if up not in VERDICTS:
                raise UserError(f"verdict: {v!r} is not one of {', '.join(VERDICTS)}")
            wanted.add(up)
        preds.append(lambda f: f.verdict in wanted)

    def sided(either: str, from_: str, to: str, build, on_src, on_dst) -> None:
        if vals(either):
            ms = [build(v, either) for v in vals(either)]
            preds.append(lambda f: any(m(on_src(f)) or m(on_dst(f)) for m in ms))
        if vals(from_):
            m_src = _any([build(v, from_) for v in vals(from_)])
            preds.append(lambda f: m_src(on_src(f)))
        if vals(to):
            m_dst = _any([build(v, to) for v in vals(to)])
            preds.append(lambda f: m_dst(on_dst(f)))

    sided("pod", "from_pod", "to_pod", lambda v, _n: _pod_matcher(v),
          lambda f: f.source, lambda f: f.destination)
    sided("label", "from_label", "to_label", lambda v, _n: _label_matcher(v),
          lambda f: f.source, lambda f: f.destination)
    # a forward packet went to the service (destination_service); a reply comes from it
    sided("service", "from_service", "to_service", lambda v, _n: _service_matcher(v),
          lambda f: f.service if f.is_reply else None,
          lambda f: None if f.is_reply else f.service)

    def identity_eq(v: str, field: str):
        n = _int(v, field, 0, 2**32 - 1)
        return lambda ident: ident == n

    sided("identity", "from_identity", "to_identity", identity_eq,
          lambda f: f.src_identity, lambda f: f.dst_identity)
    sided("ip", "from_ip", "to_ip", _ip_matcher, lambda f: f.src_ip, lambda f: f.dst_ip)

    def port_eq(v: str, field: str):
        n = _int(v, field, 0, 65535)
        return lambda port: port == n

    def l4_port(side: int):
        def get(f: Flow) -> int | None:
            if f.protocol not in (PROTO_TCP, PROTO_UDP):
                return None
            return f.sport if side == 0 else f.dport
        return get

    sided("port", "from_port", "to_port", port_eq, l4_port(0), l4_port(1))

    if vals("protocol"):
        l4s, l7s = set(), set()
        for v in vals("protocol"):
            low = v.lower()
            if low in PROTOCOLS:
                l4s.add(PROTOCOLS[low])
            elif low in ("http", "kafka", "dns"):
                l7s.add(low)
            else:
                raise UserError(f"protocol: {v!r} is not one of tcp, udp, icmp, http, kafka, dns")
        preds.append(lambda f: f.protocol in l4s or bool((l7 := f.l7) and l7s & set(l7)))

    if vals("http_method"):
        methods = {v.upper() for v in vals("http_method")}
        preds.append(lambda f: bool((l7 := f.l7) and l7.get("http", {}).get("method", "")
                                    .upper() in methods))
    if vals("http_path"):
        try:
            paths = [re.compile(v) for v in vals("http_path")]
        except re.error as exc:
            raise UserError(f"http_path: not a valid regular expression: {exc}") from None

        def path_ok(f: Flow) -> bool:
            l7 = f.l7
            if not l7 or "http" not in l7:
                return False
            url = l7["http"].get("url", "")
            path = re.sub(r"^[a-z]+://[^/]*", "", url)
            return any(p.search(path) for p in paths)

        preds.append(path_ok)

    if vals("http_status"):
        preds.append(http_status_matcher(vals("http_status")))

    if vals("traffic_direction"):
        dirs = set()
        for v in vals("traffic_direction"):
            up = v.upper()
            if up not in ("INGRESS", "EGRESS"):
                raise UserError(f"traffic_direction: {v!r} is not ingress or egress")
            dirs.add(0 if up == "INGRESS" else 1)
        preds.append(lambda f: f.direction in dirs)
    if vals("node_name"):
        names = set(vals("node_name"))
        preds.append(lambda f: f.node_name in names)

    since = scalar("since")
    until = scalar("until")
    last = scalar("last")
    first = scalar("first")
    follow = (scalar("follow") or "").lower() in ("1", "true", "yes")
    if last is not None and first is not None:
        raise UserError("last: cannot be combined with first")
    last_n = _int(last, "last", 0, 10**9) if last is not None else None
    first_n = _int(first, "first", 0, 10**9) if first is not None else None
    if last_n is None and first_n is None and since is None and not follow:
        last_n = default_last
    return FlowQuery(
        predicates=tuple(preds),
        since_ns=parse_time(since, "since") if since else None,
        until_ns=parse_time(until, "until") if until else None,
        last=last_n, first=first_n, follow=follow)
