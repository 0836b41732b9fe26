"""HTTP/1.1 inside the proxy process: one `HttpConnection` per redirected connection.

Heads (request line / status line and headers) are parsed by httptools (llhttp); the proxy
decides on the head and then streams the body: a Content-Length body is one `PASS n`, a
chunked body is walked chunk by chunk (each chunk's data one `PASS n`), so a body of any
size never sits in memory. Responses must go back in request order: a local answer (403)
to a pipelined request waits in `pending` until the responses before it have ended."""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs
import httptools
import orjson
from pylium.l7.parser import (
    CLOSE,
    DROP,
    INJECT,
    INSERT,
    MORE,
    PASS,
    ConnectionInfo,
    ConnectionParser,
    Emit,
    FastPath,
    FastRecord,
    Grant,
    GrantsNow,
    Op,
    ParserFactory,
)
from pylium.policy.http import SUPPORTED_MISMATCH, HeaderMatch, PortRuleHTTP

#: the largest request/response head accepted (Envoy's default max_request_headers_kb is 60)
MAX_HEAD = 64 * 1024
#: header values never copied into flows
REDACTED = {"authorization", "proxy-authorization", "cookie", "set-cookie"}
ACCESS_DENIED = b"Access denied\r\n"


class BadMessage(Exception):
    """The bytes are not HTTP/1.x we can frame safely: answered 400 (requests) or the
    connection is closed (responses)."""


# rules --------------------------------------------------------------------------------------

def rule_from_json(data: Mapping[str, Any]) -> PortRuleHTTP:
    """A `PortRuleHTTP` from the agent's JSON (attrs field names)."""
    known = {"method", "path", "host", "headers", "header_matches"}
    extra = set(data) - known
    if extra:
        raise ValueError(f"unknown HTTP rule field(s) {sorted(extra)}")
    matches = []
    for m in data.get("header_matches") or ():
        match = HeaderMatch(**m)
        if match.mismatch not in SUPPORTED_MISMATCH:
            raise ValueError(f"headerMatches mismatch {match.mismatch!r} is not enforced")
        matches.append(match)
    return PortRuleHTTP(method=data.get("method", ""), path=data.get("path", ""),
                        host=data.get("host", ""), headers=tuple(data.get("headers") or ()),
                        header_matches=tuple(matches))


@attrs.frozen
class Judgement:
    allowed: bool
    rule: str = ""
    #: header names a `mismatch: LOG` headerMatch found missing or different
    logged: tuple[str, ...] = ()


def judge(grants: tuple[Grant, ...] | None, method: str, path: str, host: str,
          headers: Mapping[str, str]) -> Judgement:
    """Allowed when any grant allows every request or any of its rules matches."""
    for grant in grants or ():
        if grant.allow_all:
            return _allowed(grant.rule)
        for rule in grant.rules:
            # the headers only for a rule that looks at them (most do not)
            logged = rule.check(method, path, host, dict(headers)
                                if rule.headers or rule.header_matches else None)
            if logged is not None:
                return Judgement(True, grant.rule, tuple(logged)) if logged else \
                    _allowed(grant.rule)
    return DENIED


DENIED = Judgement(False)
#: rule name -> its plain allow (a frozen attrs instance costs more to make than to find)
_ALLOWED: dict[str, Judgement] = {}


def _allowed(rule: str) -> Judgement:
    found = _ALLOWED.get(rule)
    if found is None:
        if len(_ALLOWED) > 4096:
            _ALLOWED.clear()
        found = _ALLOWED[rule] = Judgement(True, rule)
    return found


# heads --------------------------------------------------------------------------------------

class Head:
    """One parsed request or response head (a plain slotted class: one is made per
    message, on the proxy's hot path)."""

    __slots__ = ("size", "version", "method", "url", "status", "headers", "keep_alive",
                 "upgrade", "by_name")

    def __init__(self, size: int, version: str = "1.1", method: str = "", url: str = "",
                 status: int = 0, headers: list[dict[str, str]] | None = None,
                 keep_alive: bool = True, upgrade: bool = False,
                 by_name: dict[str, list[str]] | None = None):
        self.size = size
        self.version = version
        self.method = method
        self.url = url
        self.status = status
        #: [{"key": name, "value": value}] in order (the flow record's form)
        self.headers = headers if headers is not None else []
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        #: lower-case name -> values in order (built once per head: framing and rules ask)
        self.by_name = by_name if by_name is not None else {}

    def get(self, name: str) -> str | None:
        found = self.by_name.get(name.lower())
        return found[0] if found else None

    def all(self, name: str) -> list[str]:
        return self.by_name.get(name.lower(), [])


class _FirstValues(Mapping):
    """name -> first value of a head's headers, made into a dict only by a rule that
    looks at headers."""

    __slots__ = ("by_name",)

    def __init__(self, by_name: dict[str, list[str]]):
        self.by_name = by_name

    def __getitem__(self, name: str) -> str:
        return self.by_name[name][0]

    def __iter__(self):
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)


class _Collector:
    """httptools callbacks: keep the pieces of one head (decoded afterwards, all at once:
    a Python callback per header is the hot path's cost)."""

    __slots__ = ("url", "raw", "complete", "keep_alive", "parser")

    def __init__(self):
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.keep_alive = True
        #: the parser calling back (set by its maker)
        self.parser: Any = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:  # whole name and value
        self.raw.append((name, value))

    def on_headers_complete(self) -> None:
        # asked now: once the message is complete llhttp has reset what it says
        # (`Connection: close` on a request without body read as keep-alive)
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()

    def decoded(self) -> tuple[list[dict[str, str]], dict[str, list[str]]]:
        """(headers in order, as flow records carry them: {"key", "value"};
        lower-case name -> values in order)."""
        headers = [{"key": name.decode("latin-1"),
                    "value": value.decode("latin-1").strip(" \t")}
                   for name, value in self.raw]
        by_name = {header["key"].lower(): [header["value"]] for header in headers}
        if len(by_name) != len(headers):  # a name repeats: every value, in order
            by_name = {}
            for header in headers:
                by_name.setdefault(header["key"].lower(), []).append(header["value"])
        return headers, by_name


def find_head_end(data: bytes | memoryview) -> int:
    """Bytes up to and including the blank line ending the head, or -1."""
    found = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4) if isinstance(data, bytes) else \
        bytes(data[:MAX_HEAD + 4]).find(b"\r\n\r\n")
    return found + 4 if found >= 0 else -1


def parse_head(data: bytes, response: bool) -> Head:
    """Parse exactly one head (`data` ends with its blank line); BadMessage if invalid."""
    collector = _Collector()
    parser = collector.parser = (httptools.HttpResponseParser if response else
                                 httptools.HttpRequestParser)(collector)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # the head is complete; what follows belongs to another protocol
    except httptools.HttpParserError as exc:
        # llhttp pauses after the head of a 101 / CONNECT answer: the head itself is fine
        if not (collector.complete and "upgrade" in str(exc).lower()):
            raise BadMessage(str(exc) or type(exc).__name__) from None
    finally:
        collector.parser = None  # no reference cycle left for the collector
    if not collector.complete:
        raise BadMessage("incomplete head")
    headers, by_name = collector.decoded()
    if response:
        try:
            status = int(data[9:12])
        except ValueError:
            raise BadMessage("bad status code") from None
        return Head(len(data), parser.get_http_version(), "", "", status, headers,
                    collector.keep_alive, parser.should_upgrade(), by_name)
    return Head(len(data), parser.get_http_version(),
                parser.get_method().decode("ascii", "replace"),
                collector.url.decode("latin-1"), 0, headers, collector.keep_alive,
                parser.should_upgrade(), by_name)


class _Stream(_Collector):
    """httptools callbacks of a parser kept for one direction of a connection and fed
    whole messages (head and body), like the stack's floor: no parser per message."""

    __slots__ = ("begun", "ended", "chunked")

    def __init__(self):
        super().__init__()
        self.begun = self.ended = 0
        self.chunked = False

    def on_message_begin(self) -> None:
        self.begun += 1
        self.url = b""
        self.raw = []
        self.chunked = False

    def on_chunk_header(self) -> None:
        self.chunked = True

    def on_message_complete(self) -> None:
        self.ended += 1


class StreamParser:
    """One direction's persistent httptools parser, used only while it stands at a message
    boundary: `whole(data)` parses `data` if it is exactly one complete message without
    chunks, else returns None and the caller drops it (and parses the head the general
    way; a new stream parser starts at the next message)."""

    __slots__ = ("response", "collector", "parser")

    def __init__(self, response: bool):
        self.response = response
        self.collector = _Stream()
        # (a reference cycle, collector <-> parser, as long as the connection lives; the
        # stream parser is made only for heads not cached)
        self.parser = self.collector.parser = (httptools.HttpResponseParser if response else
                                               httptools.HttpRequestParser)(self.collector)

    def one(self, data: bytes) -> bool:
        """Parse `data`: True if it held exactly one complete message without chunks
        (else the caller drops this parser: it no longer stands at a boundary)."""
        c = self.collector
        begun = c.begun
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return False
        return c.begun == begun + 1 and c.ended == c.begun and not c.chunked

    def whole(self, data: bytes) -> Head | None:
        if not self.one(data):
            return None
        c = self.collector
        parser = self.parser
        if parser.should_upgrade():
            return None
        end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            return None
        headers, by_name = c.decoded()
        if self.response:
            try:
                status = int(data[9:12])
            except ValueError:
                return None
            return Head(end + 4, parser.get_http_version(), "", "", status, headers,
                        c.keep_alive, False, by_name)
        return Head(end + 4, parser.get_http_version(),
                    parser.get_method().decode("ascii", "replace"),
                    c.url.decode("latin-1"), 0, headers, c.keep_alive, False, by_name)


_BEGIN, _END, _CHUNK = 1, 2, 3
_ONE_MESSAGE = [_BEGIN, _END]


class _EventProtocol:
    """httptools callbacks of a `MessageParser`: partials of `list.append`, called from C
    (httptools calls back only what its protocol object has: nothing per header, and no
    Python frame per message)."""

    __slots__ = ("on_message_begin", "on_message_complete", "on_chunk_header")

    def __init__(self, events: list[int]):
        self.on_message_begin = functools.partial(events.append, _BEGIN)
        self.on_message_complete = functools.partial(events.append, _END)
        self.on_chunk_header = functools.partial(events.append, _CHUNK)


class MessageParser:
    """One direction's persistent httptools parser for the fast paths: fed a read, it
    validates it (llhttp, strict) and its `events` say whether the read was exactly one
    whole message without chunks (`_ONE_MESSAGE`); nothing is called back per header (a
    fast path takes the head's headers from `_HEAD_BLOCKS` by the header block's bytes).
    Used only while it stands at a message boundary: after a read it declines, the caller
    drops it."""

    __slots__ = ("events", "parser")

    def __init__(self, response: bool):
        #: what the last feed saw (`_BEGIN`, `_END`, `_CHUNK` in order)
        self.events: list[int] = []
        self.parser = (httptools.HttpResponseParser if response else
                       httptools.HttpRequestParser)(_EventProtocol(self.events))


def body_framing(head: Head, response: bool, request_method: str = "") -> tuple[str, int]:
    """("none"|"length"|"chunked"|"close", length) as RFC 9112 section 6.3 says; refuses
    what a smuggling attack needs (Transfer-Encoding with Content-Length, a non-chunked
    final coding on a request, differing Content-Lengths)."""
    if response and (request_method == "HEAD" or 100 <= head.status < 200
                     or head.status in (204, 304)):
        return "none", 0
    if response and request_method == "CONNECT" and 200 <= head.status < 300:
        return "close", 0
    by_name = head.by_name
    if "transfer-encoding" not in by_name:  # the common case, decided without the lists
        lengths_seen = by_name.get("content-length")
        if lengths_seen is None:
            return ("close", 0) if response else ("none", 0)
        if len(lengths_seen) == 1:
            value = lengths_seen[0]
            if value.isascii() and value.isdigit() and len(value) <= 18:
                return "length", int(value)
    encodings = [e.strip().lower() for v in head.all("transfer-encoding") for e in v.split(",")
                 if e.strip()]
    lengths = {v.strip() for v in head.all("content-length") for v in v.split(",")}
    if encodings:
        if lengths:
            raise BadMessage("both Transfer-Encoding and Content-Length")
        if encodings[-1] == "chunked" and encodings.count("chunked") == 1:
            return "chunked", 0
        if response:
            return "close", 0
        raise BadMessage(f"unsupported Transfer-Encoding {', '.join(encodings)}")
    if lengths:
        if len(lengths) > 1:
            raise BadMessage("conflicting Content-Length values")
        value = lengths.pop()
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise BadMessage(f"bad Content-Length {value!r}")
        return "length", int(value)
    return ("close", 0) if response else ("none", 0)


class ChunkedBody:
    """Walks chunked framing (size line, data, CRLF, ..., last chunk, trailers), telling
    the caller how many bytes each step spans; chunk data is never looked at."""

    def __init__(self):
        self.state = "size"
        self.done = False

    def step(self, data: bytes | memoryview) -> tuple[int, int] | None:
        """(framing bytes to pass, chunk data bytes to pass after them), or None = more."""
        if self.state == "size":
            line_end = bytes(data[:1026]).find(b"\r\n")
            if line_end < 0:
                if len(data) > 1024:
                    raise BadMessage("chunk size line too long")
                return None
            size_text = bytes(data[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadMessage(f"bad chunk size {size_text[:20]!r}") from None
            if not size_text or size_text[:1] in (b"+", b"-") or size_text.startswith(b"0x"):
                raise BadMessage(f"bad chunk size {size_text[:20]!r}")
            if size == 0:
                self.state = "trailers"
                return line_end + 2, 0
            self.state = "crlf"
            return line_end + 2, size
        if self.state == "crlf":
            if len(data) < 2:
                return None
            if bytes(data[:2]) != b"\r\n":
                raise BadMessage("chunk data not followed by CRLF")
            self.state = "size"
            return 2, 0
        # trailers: header lines until an empty line
        line_end = bytes(data[:MAX_HEAD]).find(b"\r\n")
        if line_end < 0:
            if len(data) > MAX_HEAD:
                raise BadMessage("trailers too long")
            return None
        if line_end == 0:
            self.done = True
            self.state = "size"
        return line_end + 2, 0


# one connection -----------------------------------------------------------------------------

class Pending(NamedTuple):
    """A response the client is owed, in request order: from the upstream (`local` None)
    or answered by the proxy (`local` = the bytes). A tuple: one is made per request."""

    method: str = ""
    url: str = ""
    version: str = "1.1"
    started_ns: int = 0
    local: bytes | None = None
    close_after: bool = False
    #: the response record's fields up to its code, encoded, when the response may take
    #: the fast path (not for HEAD or CONNECT, whose framing llhttp cannot know)
    response_fields: bytes | None = None


_pending = tuple.__new__  # Pending(...) runs NamedTuple's Python __new__: one per request


def local_reply(status: int, reason: str, body: bytes, version: str = "1.1",
                close: bool = False) -> bytes:
    head = (f"HTTP/{version} {status} {reason}\r\ncontent-length: {len(body)}\r\n"
            "content-type: text/plain\r\n")
    if close:
        head += "connection: close\r\n"
    return head.encode() + b"\r\n" + body


_EMPTY: dict[str, str] = {}
#: verdicts cached per set of grants at most, by request head and by (request line, host)
#: each (a client that never repeats a request gains nothing from them; one is ~0.4 KB),
#: sets of grants with cached verdicts at most, and the longest request line + host cached
#: (a longer one is judged every time)
VERDICT_CACHE = 1024
VERDICT_GRANT_SETS = 64
VERDICT_KEY_MAX = 1024
#: header fragments cached at most (values that change per message, e.g. Date, come and
#: go), and the longest value cached
FRAGMENT_CACHE = 4096
FRAGMENT_VALUE_MAX = 256
_now = time.monotonic_ns
_NO_GRANTS_YET = object()
#: no head found yet (no read starts with a NUL byte and has a body of length -1)
_NO_HEAD = (b"\0", (b"", -1, None, None, None, -1))
#: id(grants) -> (grants, {(request line, host): verdict}, whether a rule looks at headers,
#: {request head: what the fast path needs of it}): one cache per policy key's grants,
#: shared by the connections it covers (new connections start warm). The grants object is
#: held, so its id is not reused while the entry lives; a policy push makes new grants
#: objects, so a push reaches the next request.
_VERDICTS: dict[int, tuple[Any, dict[tuple[bytes, bytes], Any], bool, dict[bytes, Any]]] = {}


def _verdicts_of(grants: Any) -> tuple[Any, dict[tuple[bytes, bytes], Any], bool,
                                       dict[bytes, Any]]:
    """The `_VERDICTS` entry of these grants (made empty when they are new)."""
    entry = _VERDICTS.get(id(grants))
    if entry is None or entry[0] is not grants:
        if len(_VERDICTS) >= VERDICT_GRANT_SETS:
            _VERDICTS.clear()
        entry = _VERDICTS[id(grants)] = (grants, {}, any(
            rule.headers or rule.header_matches for grant in grants or ()
            for rule in grant.rules), {})
    return entry


class _Fragments(dict):
    """(name, value) as httptools gave them -> the header as a member of a flow record's
    `headers` array, encoded: most headers repeat from message to message (Host, Server,
    Content-Type, ...), so a head's part of its record is mostly dictionary lookups. A
    missing one is made by `__missing__`, so a head's fragments are one
    `map(_FRAGMENT, raw)` in C (no Python frame per header, no comprehension's function
    per message)."""

    def __missing__(self, header: tuple[bytes, bytes]) -> bytes:
        """One header's fragment, as `flow_headers` has it (value trimmed, or redacted);
        cached unless redacted (a secret is not kept) or long."""
        name, value = header
        key = name.decode("latin-1")
        if key.lower() in REDACTED:
            return orjson.dumps({"key": key, "value": "[redacted]"})
        fragment = orjson.dumps({"key": key, "value": value.decode("latin-1").strip(" \t")})
        if len(value) <= FRAGMENT_VALUE_MAX:
            if len(self) >= FRAGMENT_CACHE:
                self.clear()
            self[header] = fragment
        return fragment


_FRAGMENTS = _Fragments()
_FRAGMENT = _FRAGMENTS.__getitem__


#: header blocks cached at most (a block with a Date header changes once a second), and
#: the longest block cached
HEAD_BLOCK_CACHE = 4096
HEAD_BLOCK_MAX = 1024
_REDACTED_NAMES = frozenset(name.encode() for name in REDACTED)


class _HeadBlocks(dict):
    """A head's header block (the bytes after its first line, up to and without the blank
    line), as a `MessageParser` accepted it -> (the headers' part of the flow record's
    `headers` array, encoded; the first Host value, trimmed; the headers as httptools would
    call them back: (name, value without leading whitespace), for rules that look at
    headers). Most heads repeat their block byte for byte (a client's, a server's but for
    Date once a second), so a fast path's headers are one lookup. llhttp accepted the block
    strictly (CRLF line ends, no folding, a token and a colon starting every line), so
    bytes methods split it as llhttp did. Not kept: a block with a secret (the key would
    keep it) or a long one."""

    def __missing__(self, block: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
        raw = []
        host = None
        secret = False
        for line in block.split(b"\r\n")[:-1]:  # (the block ends with CRLF, or is empty)
            name, _, value = line.partition(b":")
            raw.append((name, value.lstrip(b" \t")))
            lower = name.lower()
            if host is None and lower == b"host":
                host = value.strip(b" \t")
            secret = secret or lower in _REDACTED_NAMES
        entry = (b",".join(map(_FRAGMENT, raw)), host or b"", raw)
        if not secret and len(block) <= HEAD_BLOCK_MAX:
            if len(self) >= HEAD_BLOCK_CACHE:
                self.clear()
            self[block] = entry
        return entry


_HEAD_BLOCKS = _HeadBlocks()
_HEAD_BLOCK = _HEAD_BLOCKS.__getitem__
#: a final response's head (status line to blank line) as a `MessageParser` accepted it with
#: its whole body -> (its record's fields from the code to the latency's value, encoded:
#: b'"code":200,"protocol":"HTTP/1.1","headers":[...]},"latency_ns":'; that body's length).
#: Most responses repeat their head byte for byte (but for Date, once a second). llhttp
#: frames a response by its head alone, so a read of a head found here and a body of that
#: length is one whole response, read as before. Kept like `_HEAD_BLOCKS` (never with a
#: secret, at most HEAD_BLOCK_CACHE, none over HEAD_BLOCK_MAX).
_RESPONSE_HEADS: dict[bytes, tuple[bytes, int]] = {}


def _content_length(raw: list[tuple[bytes, bytes]]) -> int:
    """The body length of a head llhttp accepted as a message without chunks or upgrade:
    its Content-Length (llhttp refuses several, or one not a number), else none; -1 for a
    value Python reads otherwise (the read is left to the general path)."""
    for name, value in raw:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return 0


def _response_entry(head: bytes, status: int, body: int) -> tuple[bytes, int] | None:
    """The `_RESPONSE_HEADS` entry of a head llhttp accepted with `status` as one whole
    response of `body` bytes after the head, made (and kept if it may be); None for a read
    the fast path leaves to the general one: an interim response (1xx, a 101 included), a
    status line not laid out as `HTTP/x.y NNN` with llhttp's status, or bytes after the
    body its head frames (empty lines llhttp skips before a next message)."""
    if status < 200 or head[8:9] != b" " or head[9:12] != b"%03d" % status:
        return None
    line_end = head.find(b"\r\n")
    block = head[line_end + 2:-2]
    fragments, _host, raw = _HEAD_BLOCK(block)
    if body != (0 if status in (204, 304) else _content_length(raw)):
        return None
    entry = (b'"code":%d,"protocol":"HTTP/%b","headers":[%b]},"latency_ns":'
             % (status, head[5:8], fragments), body)
    if block in _HEAD_BLOCKS and len(head) <= HEAD_BLOCK_MAX:  # no secret, not long
        if len(_RESPONSE_HEADS) >= HEAD_BLOCK_CACHE:
            _RESPONSE_HEADS.clear()
        _RESPONSE_HEADS[head] = entry
    return entry


def _response_fields(method: str, url: str) -> bytes | None:
    """The response record's fields up to its code (`Pending.response_fields`)."""
    if method in ("HEAD", "CONNECT"):
        return None
    return (b'"verdict":"FORWARDED","l7":{"type":"RESPONSE","http":'
            + orjson.dumps({"method": method, "url": url})[:-1] + b",")


def flow_headers(head: Head) -> list[dict[str, str]]:
    if REDACTED.isdisjoint(head.by_name):  # the usual head: nothing to hide
        return head.headers[:]  # the records themselves (the head is not kept)
    return [{"key": h["key"], "value": "[redacted]"} if h["key"].lower() in REDACTED
            else h for h in head.headers]


class HttpConnection(ConnectionParser):
    """Request and response state of one client connection."""

    #: `PASS(n), MORE` = a whole message passed, the next starts with a head: no b"" call
    boundary_more = True

    def __init__(self, info: ConnectionInfo, grants: GrantsNow, emit: Emit):
        self.info = info
        self.grants = grants
        self.emit = emit
        self.pending: collections.deque[Pending] = collections.deque()
        self.req_state = "head"        # head | chunked | tunnel | closed
        self.req_chunks: ChunkedBody | None = None
        self.req_chunk_drop = False
        self.resp_state = "head"       # head | chunked | finish | close | tunnel
        self.resp_chunks: ChunkedBody | None = None
        self.upgrade_pending = False
        #: persistent parsers of each direction while it moves in whole messages
        self.req_stream: StreamParser | None = None
        self.resp_stream: StreamParser | None = None
        #: the fast paths' parsers of each direction (no callback per header)
        self.req_messages: MessageParser | None = None
        self.resp_messages: MessageParser | None = None
        #: the head the fast path last found in `_heads` / `_RESPONSE_HEADS` and its entry:
        #: a keep-alive connection mostly repeats its messages, and a read starting with
        #: that head (it ends with the head's only blank line: its head is that head) is
        #: found by comparing its first bytes
        self._last_request: tuple[bytes, Any] = _NO_HEAD
        self._last_response: tuple[bytes, Any] = _NO_HEAD
        #: the last fast response's record prefix (its request's part, its head's part,
        #: the two joined: the same object while they recur, `FastRecord`)
        self._response_prefix: tuple[bytes, bytes, bytes] = (b"", b"", b"")
        #: for `_verdicts_for` only (`_VERDICTS`): the head of a request the fast path
        #: took -> what it needs of that request again (its record, as the `FastRecord`
        #: `(record, b"")`, method, URL, version, `response_fields`, its body's length)
        self._heads: dict[bytes, Any] = {}
        #: (request line, host) -> what the fast path needs of an allowed request whose
        #: head is not kept (its record's fields up to the headers, method, URL,
        #: `response_fields`, version, what follows the headers), or False; while no rule
        #: looks at headers
        self._verdicts: dict[tuple[bytes, bytes], Any] = {}
        self._verdicts_for: Any = _NO_GRANTS_YET
        self._header_rules = False

    # the fast paths: one whole message per read ---------------------------------------------
    def fast_paths(self) -> tuple[FastPath, FastPath]:
        return self._fast_request, self._fast_response

    def _fast_request(self, data: bytes) -> FastRecord | None:
        """One whole allowed request without chunks, upgrade or absolute URL: forwarded as
        read. Its head's bytes find it judged under these grants (`_heads`; the head this
        connection last found there, first): its record, what its response needs, and its
        body's length (llhttp frames a request by its head alone: that head and a body of
        that length are one whole request, read as before). Any other read is parsed and
        judged first (`_judge_request`)."""
        if self.req_state != "head" or self.upgrade_pending:
            return None
        grants = self.grants()
        if grants is not self._verdicts_for:  # a policy push: the new grants' verdicts
            (self._verdicts_for, self._verdicts, self._header_rules,
             self._heads) = _verdicts_of(grants)
            self._last_request = _NO_HEAD
        last = self._last_request
        if data.startswith(last[0]) and len(data) - len(last[0]) == last[1][5]:
            found = last[1]
        else:
            # the head: up to the first blank line (llhttp accepts CRLF line ends only)
            end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4) + 4
            head = data if end == len(data) else data[:end]
            found = self._heads.get(head)
            if found is not None and found[5] == len(data) - end:
                self._last_request = (head, found)
            else:
                found = self._judge_request(data, end, grants)
                if found is None:
                    return None
        self.pending.append(_pending(Pending, (found[1], found[2], found[3], _now(), None,
                                               False, found[4])))
        return found[0]  # (its record, b""): the whole record recurs

    def _judge_request(self, data: bytes, end: int, grants: Any) -> Any:
        """`_fast_request` of a read whose head it did not find (with that body's length):
        llhttp validates the read (`MessageParser`), the head is judged (`_decide`) and its
        `_heads` entry made, from the head's bytes alone (the key); kept unless its header
        block is not (a secret, or long: `_HeadBlocks`) or the head is long. None: the
        general path takes the read."""
        messages = self.req_messages
        if messages is None:
            messages = self.req_messages = MessageParser(False)
        parser = messages.parser
        events = messages.events
        events.clear()
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            events.clear()
        head = data[:end]
        line_end = head.find(b"\r\n")
        # not one whole message; empty lines before the request line (llhttp skips them:
        # the bytes before the first CRLF are then no request line); an upgrade (CONNECT)
        if events != _ONE_MESSAGE or end < 4 or line_end <= 0 or parser.should_upgrade():
            self.req_messages = None  # the general path parses it again
            return None
        block = head[line_end + 2:-2]
        fragments, host, raw = _HEAD_BLOCK(block)
        if len(data) - end != _content_length(raw):  # empty lines after it (llhttp skips)
            self.req_messages = None
            return None
        # the request line (method, URL, version: llhttp checked its form) and the host
        key = (head[:line_end], host)
        found = None if self._header_rules else self._verdicts.get(key)
        if found is None:
            found = self._decide(key, grants, parser.get_method(),
                                 raw if self._header_rules else None)
        if found is False:
            self.req_messages = None
            return None
        found = ((b"%b%b%b]}}" % (found[0], fragments, found[5]), b""), found[1], found[2],
                 found[4], found[3], len(data) - end)  # (a `FastRecord` made once)
        if block in _HEAD_BLOCKS and len(head) <= HEAD_BLOCK_MAX:
            heads = self._heads
            if len(heads) >= VERDICT_CACHE:
                heads.clear()
            heads[head] = found
        return found

    def _decide(self, key: tuple[bytes, bytes], grants: Any, method_raw: bytes,
                raw: list[tuple[bytes, bytes]] | None = None) -> Any:
        """Judge a request not seen since the last policy push and remember the answer;
        with `raw` (the head's headers: a rule looks at them), judge it with them and
        remember nothing. False also for what the fast path leaves to the general one: an
        absolute or asterisk URL, a line not ending in HTTP/x.y (HTTP/0.9)."""
        verdicts = self._verdicts
        if len(verdicts) >= VERDICT_CACHE:
            verdicts.clear()
        if raw is not None or len(key[0]) + len(key[1]) > VERDICT_KEY_MAX:
            verdicts = {}  # judged, not kept
        line = key[0]
        # the key is the line's bytes: it must be the whole request line, method first;
        # llhttp took the URL as what lies between the spaces after the method and those
        # before the version (it has no space in it)
        url_raw = line[len(method_raw):-9].strip(b" ")
        if not line.startswith(method_raw + b" ") or line[-9:-3] != b" HTTP/" or \
                url_raw[:1] != b"/":
            verdicts[key] = False
            return False
        method = method_raw.decode("ascii", "replace")
        path = url_raw.decode("latin-1")
        host = key[1].decode("latin-1")
        version = line[-3:].decode("ascii")
        headers = _EMPTY
        if raw is not None:  # first value per name, as `_FirstValues` has them
            headers = {}
            for name, value in raw:
                headers.setdefault(name.decode("latin-1").lower(),
                                   value.decode("latin-1").strip(" \t"))
        verdict = judge(grants, method, path, host, headers)
        if not verdict.allowed:
            verdicts[key] = False
            return False
        url = f"http://{host}{path}" if host else path
        http = orjson.dumps({"method": method, "url": url, "protocol": f"HTTP/{version}"})
        mismatch = b""  # after the headers, as the general path reports it
        if verdict.logged:
            mismatch = (b"," if raw else b"") + orjson.dumps(
                {"key": "x-pylium-header-mismatch", "value": ",".join(verdict.logged)})
        found = verdicts[key] = (
            b'"verdict":"FORWARDED","rule":' + orjson.dumps(verdict.rule)
            + b',"l7":{"type":"REQUEST","http":' + http[:-1] + b',"headers":[',
            method, url, _response_fields(method, url), version, mismatch)
        return found

    def _fast_response(self, data: bytes) -> FastRecord | None:
        """The whole final response to the one request outstanding (not to HEAD or
        CONNECT), without chunks: forwarded as read. Its head's bytes find its record's
        part from the code on, and its body's length (`_RESPONSE_HEADS`; the head this
        connection last found there, first); any other read is parsed first
        (`_parse_response`)."""
        pending = self.pending
        if len(pending) != 1 or self.resp_state != "head" or self.upgrade_pending:
            return None
        request = pending[0]
        fields = request.response_fields
        if fields is None:
            return None
        last = self._last_response
        if data.startswith(last[0]) and len(data) - len(last[0]) == last[1][1]:
            found = last[1]
        else:
            end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4) + 4
            head = data if end == len(data) else data[:end]
            found = _RESPONSE_HEADS.get(head)
            if found is not None and found[1] == len(data) - end:
                self._last_response = (head, found)
            else:
                found = self._parse_response(data, end)
                if found is None:
                    return None
        pending.popleft()
        prefix = self._response_prefix
        if prefix[0] is not fields or prefix[1] is not found[0]:
            prefix = self._response_prefix = (fields, found[0], fields + found[0])
        return prefix[2], b"%d}" % (_now() - request.started_ns)

    def _parse_response(self, data: bytes, end: int) -> tuple[bytes, int] | None:
        """`_fast_response` of a read whose head it did not find (with that body's
        length): llhttp validates it (`MessageParser`), then its `_RESPONSE_HEADS` entry;
        None: the general path takes the read."""
        if data[:5] != b"HTTP/":  # (llhttp also takes RTSP/, ICE/, empty lines first)
            return None
        messages = self.resp_messages
        if messages is None:
            messages = self.resp_messages = MessageParser(True)
        parser = messages.parser
        events = messages.events
        events.clear()
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            events.clear()
        # (an upgrade is a 101, or a 2xx to CONNECT, which has no response_fields)
        if events != _ONE_MESSAGE or end < 4 or (found := _response_entry(
                data[:end], parser.get_status_code(), len(data) - end)) is None:
            self.resp_messages = None
            return None
        return found

    # requests -----------------------------------------------------------------------------
    def on_data(self, reply: bool, data: bytes | memoryview, end_stream: bool) -> list[Op]:
        return self._response(data, end_stream) if reply else self._request(data)

    def _request(self, data: bytes | memoryview) -> list[Op]:
        if self.req_state == "tunnel":
            return [PASS(len(data))] if data else [MORE]
        if self.req_state == "closed":
            return [DROP(len(data))] if data else [MORE]
        if self.upgrade_pending:
            return [MORE]  # bytes after an Upgrade request wait for the 101 (or its refusal)
        if self.req_state == "chunked":
            return self._request_chunk(data)
        return self._request_head(data)

    def _request_head(self, data: bytes | memoryview) -> list[Op]:
        if not data:
            return [MORE]
        if type(data) is bytes:  # the usual read: one whole request, parsed by the stream
            stream = self.req_stream or StreamParser(False)
            head = stream.whole(data)
            if head is not None:
                try:
                    kind, length = body_framing(head, response=False)
                except BadMessage:
                    kind, length = "", 0
                if kind in ("none", "length") and \
                        head.size + (length if kind == "length" else 0) == len(data):
                    self.req_stream = stream
                    return self._request_decided(head, data, kind, length)
            self.req_stream = None
        end = find_head_end(data)
        if end < 0:
            if len(data) > MAX_HEAD:
                return self._bad_request(len(data), "request head too large", 431,
                                         "Request Header Fields Too Large")
            try:  # fail early on garbage instead of waiting for a blank line
                httptools.HttpRequestParser(_Collector()).feed_data(bytes(data))
            except httptools.HttpParserUpgrade:
                pass
            except httptools.HttpParserError as exc:
                return self._bad_request(len(data), str(exc) or "malformed request")
            return [MORE]
        try:
            head = parse_head(bytes(data[:end]), response=False)
            kind, length = body_framing(head, response=False)
        except BadMessage as exc:
            return self._bad_request(len(data), str(exc))
        return self._request_decided(head, data, kind, length)

    def _request_decided(self, head: Head, data: bytes | memoryview, kind: str,
                         length: int) -> list[Op]:
        path, host = self._target(head)
        verdict = judge(self.grants(), head.method, path, host, _FirstValues(head.by_name))
        now = time.monotonic_ns()
        l7 = {"type": "REQUEST",
              "http": {"method": head.method, "url": self._url(head, host),
                       "protocol": f"HTTP/{head.version}", "headers": flow_headers(head)}}
        if verdict.logged:
            l7["http"]["headers"].append({"key": "x-pylium-header-mismatch",
                                          "value": ",".join(verdict.logged)})
        if verdict.allowed:
            self.emit({"verdict": "FORWARDED", "l7": l7, "rule": verdict.rule})
            url = l7["http"]["url"]
            self.pending.append(Pending(head.method, url, head.version, now,
                                        response_fields=_response_fields(head.method, url)))
            if head.upgrade or head.method == "CONNECT":
                self.upgrade_pending = True
            if kind == "length" or kind == "none":  # head and body in one PASS
                size = head.size + length
                # all there is, a whole request: the next bytes start a head (boundary_more)
                return [PASS(size), MORE] if size == len(data) else [PASS(size)]
            return [PASS(head.size), *self._body(kind, length, drop=False)]
        l7["http"]["code"] = 403
        self.emit({"verdict": "DROPPED", "l7": l7})
        expect = (head.get("expect") or "").lower() == "100-continue"
        close = expect or not head.keep_alive or head.upgrade or head.method == "CONNECT"
        reply = local_reply(403, "Forbidden", ACCESS_DENIED, head.version, close=close)
        ops = self._answer(Pending(head.method, l7["http"]["url"], head.version, now,
                                   local=reply, close_after=close))
        if close:
            self.req_state = "closed"
            return [DROP(len(data)), *ops]
        return [DROP(head.size), *ops, *self._body(kind, length, drop=True)]

    def _body(self, kind: str, length: int, drop: bool) -> list[Op]:
        if kind == "length" and length:
            return [DROP(length) if drop else PASS(length)]
        if kind == "chunked":
            self.req_state = "chunked"
            self.req_chunks = ChunkedBody()
            self.req_chunk_drop = drop
        return []

    def _request_chunk(self, data: bytes | memoryview) -> list[Op]:
        ops: list[Op] = []
        chunks = self.req_chunks
        offset = 0
        op = DROP if self.req_chunk_drop else PASS
        while True:
            try:
                found = chunks.step(data[offset:])
            except BadMessage as exc:  # part of the request is upstream already: cut it
                self.req_state = "closed"
                self.emit({"verdict": "DROPPED", "error": str(exc),
                           "l7": {"type": "REQUEST", "http": {"code": 400}}})
                return [*ops, DROP(len(data) - offset), CLOSE]
            if found is None:
                return [*ops, MORE] if ops else [MORE]
            framing, size = found
            ops.append(op(framing))
            offset += framing
            if size:
                ops.append(op(size))
                return ops  # the chunk streams; called again when it has passed
            if chunks.done:
                self.req_state = "head"
                return ops

    def _bad_request(self, size: int, reason: str, status: int = 400,
                     text: str = "Bad Request") -> list[Op]:
        self.req_state = "closed"
        self.emit({"verdict": "DROPPED", "error": reason,
                   "l7": {"type": "REQUEST", "http": {"code": status}}})
        reply = local_reply(status, text, f"{reason}\r\n".encode(), close=True)
        return [DROP(size), *self._answer(Pending(local=reply, close_after=True))]

    def _answer(self, pending: Pending) -> list[Op]:
        """A local reply now, or queued behind the responses still owed."""
        if self.pending:
            self.pending.append(pending)
            return []
        return [INJECT(pending.local), *([CLOSE] if pending.close_after else [])]

    def _target(self, head: Head) -> tuple[str, str]:
        """(path as Envoy's `:path` — with the query —, host as `:authority`)."""
        host = head.get("host") or ""
        url = head.url
        if url.startswith(("http://", "https://")):
            try:
                parsed = httptools.parse_url(url.encode("latin-1"))
            except httptools.HttpParserInvalidURLError:
                return url, host
            authority = (parsed.host or b"").decode("latin-1")
            if parsed.port:
                authority += f":{parsed.port}"
            path = (parsed.path or b"/").decode("latin-1")
            if parsed.query:
                path += "?" + parsed.query.decode("latin-1")
            return path, authority or host
        return url, host

    def _url(self, head: Head, host: str) -> str:
        if head.url.startswith(("http://", "https://")) or not host:
            return head.url
        return f"http://{host}{head.url}"

    # responses ----------------------------------------------------------------------------
    def _response(self, data: bytes | memoryview, end_stream: bool) -> list[Op]:
        if self.resp_state == "tunnel":
            return [PASS(len(data))] if data else [MORE]
        if self.resp_state == "close":  # body until the upstream closes
            if data:
                return [PASS(len(data))]
            return [*self._finish_response(), CLOSE] if end_stream else [MORE]
        if self.resp_state == "finish":
            ops = self._finish_response()
            if ops and ops[-1] is CLOSE:
                return ops
            return [*ops, *self._response(data, end_stream)]
        if self.resp_state == "chunked":
            return self._response_chunk(data)
        if not data:
            return [MORE]
        head = None
        if type(data) is bytes and self.pending and self.pending[0].local is None and \
                self.pending[0].method not in ("HEAD", "CONNECT") and not self.upgrade_pending:
            # the usual read: one whole response to a plain request, parsed by the stream
            stream = self.resp_stream or StreamParser(True)
            head = stream.whole(data)
            if head is not None:
                request = self.pending[0]
                try:
                    kind, length = body_framing(head, True, request.method)
                except BadMessage:
                    kind, length = "", 0
                if head.status < 200 or kind not in ("none", "length") or \
                        head.size + (length if kind == "length" else 0) != len(data):
                    head = None
            self.resp_stream = stream if head is not None else None
        if head is None:
            end = find_head_end(data)
            if end < 0:
                if len(data) > MAX_HEAD:
                    return self._bad_response(len(data), "response head too large")
                return [MORE]
            try:
                head = parse_head(bytes(data[:end]), response=True)
                request = self.pending[0] if self.pending and self.pending[0].local is None \
                    else Pending()
                kind, length = body_framing(head, True, request.method)
            except BadMessage as exc:
                return self._bad_response(len(data), str(exc))
        if 100 <= head.status < 200 and head.status != 101:
            return [PASS(head.size)]  # interim (100 Continue): the final response follows
        latency = time.monotonic_ns() - request.started_ns if request.started_ns else 0
        self.emit({"verdict": "FORWARDED", "is_reply": True, "l7": {
            "type": "RESPONSE", "latency_ns": latency,
            "http": {"code": head.status, "method": request.method, "url": request.url,
                     "protocol": f"HTTP/{head.version}", "headers": flow_headers(head)}}})
        ops = [PASS(head.size)]
        if self.upgrade_pending and len(self.pending) == 1:
            self.upgrade_pending = False
            if head.status == 101 or (request.method == "CONNECT" and 200 <= head.status < 300):
                self.resp_state = self.req_state = "tunnel"
                self.pending.popleft()
                return ops
            # refused upgrade: HTTP goes on; bytes the client sent early are requests again
        if kind == "length":
            if length and len(data) >= head.size + length:
                # the whole response is here (the usual small one): one PASS, done now
                size = head.size + length
                return [PASS(size), *(self._finish_response()
                                      or ((MORE,) if size == len(data) else ()))]
            if length:
                self.resp_state = "finish"
                return [*ops, PASS(length)]
            return [*ops, *self._finish_response()]
        if kind == "chunked":
            self.resp_state = "chunked"
            self.resp_chunks = ChunkedBody()
            return ops
        if kind == "close":
            self.resp_state = "close"
            return ops
        return [*ops, *self._finish_response()]

    def _response_chunk(self, data: bytes | memoryview) -> list[Op]:
        ops: list[Op] = []
        offset = 0
        while True:
            try:
                found = self.resp_chunks.step(data[offset:])
            except BadMessage as exc:
                return [*ops, *self._bad_response(len(data) - offset, str(exc), started=True)]
            if found is None:
                return [*ops, MORE] if ops else [MORE]
            framing, size = found
            ops.append(PASS(framing))
            offset += framing
            if size:
                ops.append(PASS(size))
                return ops
            if self.resp_chunks.done:
                return [*ops, *self._finish_response()]

    def _finish_response(self) -> list[Op]:
        """The response at the head of the queue has been passed whole: emit the local
        replies that waited for it."""
        self.resp_state = "head"
        if self.pending and self.pending[0].local is None:
            self.pending.popleft()
        ops: list[Op] = []
        while self.pending and self.pending[0].local is not None:
            local = self.pending.popleft()
            ops.append(INSERT(local.local))
            if local.close_after:
                ops.append(CLOSE)
                break
        return ops

    def _bad_response(self, size: int, reason: str, started: bool = False) -> list[Op]:
        self.emit({"verdict": "DROPPED", "is_reply": True, "error": reason,
                   "l7": {"type": "RESPONSE", "http": {"code": 502}}})
        if started:
            return [DROP(size), CLOSE]
        reply = local_reply(502, "Bad Gateway", f"upstream: {reason}\r\n".encode(), close=True)
        return [DROP(size), INSERT(reply), CLOSE]

    def on_upstream_failure(self, reason: str) -> list[Op]:
        """The original destination could not be reached: 503 with the reason."""
        self.req_state = "closed"
        request = self.pending[0] if self.pending else Pending()
        self.emit({"verdict": "DROPPED", "is_reply": True, "error": reason, "l7": {
            "type": "RESPONSE", "http": {"code": 503, "method": request.method,
                                         "url": request.url,
                                         "protocol": f"HTTP/{request.version}"}}})
        self.pending.clear()
        return [INJECT(local_reply(503, "Service Unavailable",
                                   f"upstream connect error: {reason}\r\n".encode(),
                                   close=True)), CLOSE]


class HttpParserFactory(ParserFactory):
    """`pylium_l7_http.parser:HttpParserFactory`, the spec the backend spawns the proxy with."""

    protocol = "http"

    def rules_from_json(self, rules: list[Mapping[str, Any]]) -> tuple[PortRuleHTTP, ...]:
        return tuple(rule_from_json(r) for r in rules)

    def new_connection(self, info: ConnectionInfo, grants: GrantsNow,
                       emit: Emit) -> HttpConnection:
        return HttpConnection(info, grants, emit)
