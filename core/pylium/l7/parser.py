"""What the L7 proxy process asks of a protocol parser, per connection (Cilium proxylib's
OnData idea): the proxy owns the sockets and the bytes; a parser only looks at the bytes
buffered in one direction and answers with operations on them. Parsers know nothing of
sockets, so they are unit-tested with byte strings, and a new protocol (Kafka, ...) plugs
in by naming a `ParserFactory` when its plugin spawns the proxy.

The contract, per call of `ConnectionParser.on_data(reply, data, end_stream)`:

* `data` is every byte of that direction not yet consumed (request bytes from the client
  when `reply` is False, response bytes from the upstream when True).
* The parser returns a list of `Op`s, applied in order:
  `PASS n` forwards the next n bytes, `DROP n` discards them (n may exceed `len(data)`:
  the rest is forwarded or discarded as it arrives, without calling the parser again —
  this is how large bodies stream without being buffered), `MORE` waits for more bytes,
  `INJECT b` writes b back to the sender of this direction (a local reply such as 403),
  `INSERT b` writes b on towards the receiver, `CLOSE` shuts the connection once
  everything before it is written.
* After the list the proxy calls again if bytes remain and the list did not end in MORE,
  and calls with `data=b""` when an outstanding PASS/DROP count reaches zero, so a parser
  can emit what waited for that point (e.g. a queued local reply after a response ends).
  A call that consumes nothing and does not ask for MORE is a parser bug: the proxy closes
  the connection rather than spin.

Optionally, a parser offers the proxy a fast path per direction (`fast_paths`): a function
given one read while nothing of that direction is outstanding, answering with the message's
flow record (pre-encoded, `FastRecord`) when the read is exactly one whole message it decided
to forward as is. The proxy then writes the read on, records the record and never calls
`on_data` for it; None leaves everything to `on_data`, as if the fast path had not been
asked. This is how a keep-alive request and its response cost one parser call each and no op
at all.
"""

from __future__ import annotations

import abc
import enum
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import attrs


class OpType(enum.Enum):
    PASS = "pass"
    DROP = "drop"
    MORE = "more"
    INJECT = "inject"
    INSERT = "insert"
    CLOSE = "close"


class Op(NamedTuple):
    """One operation (a tuple: parsers make several per request)."""

    type: OpType
    n: int = 0
    data: bytes = b""


_new_op = tuple.__new__  # Op(...) runs NamedTuple's Python __new__: PASS/DROP are per message


def PASS(n: int) -> Op:  # noqa: N802 - reads like proxylib's op names
    return _new_op(Op, (OpType.PASS, n, b""))


def DROP(n: int) -> Op:  # noqa: N802
    return _new_op(Op, (OpType.DROP, n, b""))


def INJECT(data: bytes) -> Op:  # noqa: N802
    return Op(OpType.INJECT, data=bytes(data))


def INSERT(data: bytes) -> Op:  # noqa: N802
    return Op(OpType.INSERT, data=bytes(data))


MORE = Op(OpType.MORE)
CLOSE = Op(OpType.CLOSE)


@attrs.frozen(kw_only=True)
class ConnectionInfo:
    """One redirected connection as the proxy saw it (the transparent socket's addresses)."""

    #: "ingress" (the proxy guards a local endpoint's inbound traffic) or "egress"
    direction: str
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    src_identity: int
    dst_identity: int
    #: the local endpoint whose policy applies (destination on ingress, source on egress)
    ep_id: int = 0
    proxy_port: int = 0


@attrs.frozen(kw_only=True)
class Grant:
    """One allow that covers the connection's policy key (`pylium.policy.resolve.L7Grant`
    as the proxy receives it): `allow_all` = every request; else `rules` are the
    protocol's rule objects, as `ParserFactory.rules_from_json` rebuilt them."""

    rule: str
    allow_all: bool = False
    rules: tuple[Any, ...] = ()


#: what a parser reports per request/response: the `record_l7` fields of
#: `pylium.api.context.FlowRecorder` minus the connection's addresses and identities
#: (the proxy adds those): {"verdict": "FORWARDED"|"DROPPED", "is_reply": bool,
#: "l7": {...Hubble Layer7 JSON...}}
Emit = Callable[[dict[str, Any]], None]
GrantsNow = Callable[[], "tuple[Grant, ...] | None"]
#: a fast path's record of one message: the parser's fields as the members of a JSON object,
#: without braces, e.g. b'"verdict":"FORWARDED","l7":{...}'; always a FORWARDED record
#: without error, of the direction the fast path serves (a request so recorded counts as
#: received and forwarded). Or the record in two parts, (prefix, rest): a prefix that
#: recurs (a response's fields up to its latency; a repeated request's whole record, with
#: an empty rest) is sent to the agent once per agent connection and named by a number
#: after that, so only the rest travels (`pylium.l7.proxy.CONTROL_PROTOCOL` 5). Hand back
#: the same prefix object while it recurs: the proxy finds its number by its hash, which
#: bytes compute once.
FastRecord = bytes | tuple[bytes, bytes]
#: a fast path: one read of a direction -> its record if it was one whole message, forwarded
#: as is; None if not (the read goes to `on_data`)
FastPath = Callable[[bytes], "FastRecord | None"]


class ConnectionParser(abc.ABC):
    """The per-connection state of one protocol."""

    #: True: a list ending `PASS(n), MORE` whose PASS covers the bytes given means "a whole
    #: message, and nothing waits for its end": the proxy then skips the call with b"" when
    #: the PASS is done (one parser call per message on the hot path). Opt-in, because
    #: under the plain contract that list still gets the call.
    boundary_more: bool = False

    @abc.abstractmethod
    def on_data(self, reply: bool, data: bytes | memoryview, end_stream: bool) -> list[Op]:
        """See the module docstring."""

    def fast_paths(self) -> tuple[FastPath, FastPath] | None:
        """Optional (see the module docstring): the (request, response) fast paths; None =
        every read goes through `on_data`. A fast path that answers None must leave the
        parser as `on_data` expects to find it."""
        return None

    def on_upstream_failure(self, reason: str) -> list[Op]:
        """The original destination refused or could not be reached (`reason`, e.g.
        "connection refused"): ops for the client direction (a protocol error reply, then
        CLOSE). The proxy opens the upstream only when the first byte is passed, so a
        connection whose requests are all denied never reaches the destination."""
        return [CLOSE]


class ParserFactory(abc.ABC):
    """One protocol inside the proxy process."""

    #: the `rules.<protocol>` key this factory enforces ("http", "kafka", ...)
    protocol: str = ""
    #: the most bytes of one direction a parser may need buffered before it can decide
    #: (it must refuse larger messages itself); the proxy pauses reading only beyond this
    max_buffer: int = 0

    @abc.abstractmethod
    def rules_from_json(self, rules: list[Mapping[str, Any]]) -> tuple[Any, ...]:
        """Rebuild rule objects from the JSON the agent pushed; raise ValueError if one
        cannot be enforced (that grant then allows nothing: fail closed)."""

    @abc.abstractmethod
    def new_connection(self, info: ConnectionInfo, grants: GrantsNow,
                       emit: Emit) -> ConnectionParser:
        """A parser for one accepted connection. Call `grants()` for every request: it
        answers from the newest policy the agent pushed (a change applies to the next
        request of an open connection); None = no policy key covers the connection, so
        nothing is allowed."""


def load_factory(spec: str) -> ParserFactory:
    """`module:attribute` -> the factory (a class is instantiated). The proxy process is
    told the spec by the plugin that spawns it; the core never imports a plugin by name."""
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"parser {spec!r} is not 'module:attribute'")
    found = getattr(importlib.import_module(module), attribute)
    factory = found() if isinstance(found, type) else found
    if not isinstance(factory, ParserFactory):
        raise ValueError(f"parser {spec!r} is not a pylium.l7.parser.ParserFactory")
    return factory
