"""Kafka wire format, table-driven: `schemas.MESSAGES` says the layout of every message the
proxy reads or writes, per api key and version; this module walks those tables.

Decoding is strict (every byte of a frame must belong to a field, counts and lengths must
fit in what is left), because a frame the proxy cannot account for is never passed on.
Flexible versions (KIP-482) use compact strings/arrays (unsigned varint length + 1) and a
tagged-field section after every struct; tagged fields are never interpreted, only kept
raw (`TAGS`) so a message the proxy rewrites carries them on."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from typing import Any

from pylium_l7_kafka.schemas import MESSAGES

API_VERSIONS = 18
#: Kafka's own default for socket.request.max.bytes: larger frames are refused
MAX_FRAME = 100 * 1024 * 1024
#: the fixed part of a request header: api_key, api_version, correlation_id
HEADER_FIXED = 8

_I8, _I16, _U16, _I32, _I64, _F64 = (struct.Struct(f) for f in
                                      (">b", ">h", ">H", ">i", ">q", ">d"))
_SCALARS = {"int8": _I8, "int16": _I16, "uint16": _U16, "int32": _I32, "int64": _I64,
            "float64": _F64}

# field tuple positions (see schemas.py)
NAME, TYPE, VERSIONS, NULLABLE, TAGGED, NEVER_COMPACT, DEFAULT, TOPIC, FIELDS = range(9)


class Malformed(Exception):
    """The bytes do not follow the layout of their api key and version."""


def _within(span: tuple[int, int] | None, version: int) -> bool:
    return span is not None and span[0] <= version <= span[1]


def message(api_key: int, kind: str) -> tuple | None:
    return MESSAGES.get((api_key, kind))


def is_flexible(api_key: int, version: int) -> bool:
    found = MESSAGES.get((api_key, "request"))
    return bool(found and found[2] is not None and version >= found[2])


def response_header_flexible(api_key: int, version: int) -> bool:
    """ApiVersions answers with a v0 header at every version (so a client that sent a
    version the broker does not know can still read the reply)."""
    return api_key != API_VERSIONS and is_flexible(api_key, version)


# reading -----------------------------------------------------------------------------------

class Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | memoryview, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise Malformed(f"{n} bytes wanted at offset {self.pos}, {self.end - self.pos} left")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def scalar(self, s: struct.Struct) -> Any:
        if self.pos + s.size > self.end:
            raise Malformed(f"truncated at offset {self.pos}")
        value = s.unpack_from(self.buf, self.pos)[0]
        self.pos += s.size
        return value

    def uvarint(self) -> int:
        value = shift = 0
        for _ in range(5):
            if self.pos >= self.end:
                raise Malformed(f"truncated varint at offset {self.pos}")
            byte = self.buf[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > 0xFFFFFFFF:
                    raise Malformed("varint larger than 32 bits")
                return value
            shift += 7
        raise Malformed("varint longer than 5 bytes")

    def length(self, compact: bool, wide: bool = False) -> int:
        """A string/bytes/array length; -1 = null."""
        if compact:
            return self.uvarint() - 1
        return self.scalar(_I32 if wide else _I16)

    def left(self) -> int:
        return self.end - self.pos


#: key under which a decoded struct keeps its tagged fields (raw), so a rewritten message
#: (ApiVersions' SupportedFeatures, ...) carries them on unchanged
TAGS = "_tagged"


def read_tags(r: Reader) -> bytes:
    """Skip a tagged-field section; returns its raw bytes when it held any field."""
    start = r.pos
    count = r.uvarint()
    for _ in range(count):
        r.uvarint()  # tag
        size = r.uvarint()
        if size > r.left():
            raise Malformed("tagged field longer than the frame")
        r.pos += size
    return bytes(r.buf[start:r.pos]) if count else b""


def _read_value(r: Reader, field: tuple, kind: str, version: int, flexible: bool) -> Any:
    compact = flexible and not field[NEVER_COMPACT]
    nullable = _within(field[NULLABLE], version)
    found = _SCALARS.get(kind)
    if found is not None:
        return r.scalar(found)
    if kind == "bool":
        value = r.scalar(_I8)
        if value not in (0, 1):
            raise Malformed(f"{field[NAME]}: {value} is not a boolean")
        return bool(value)
    if kind == "uuid":
        return uuid.UUID(bytes=r.take(16))
    if kind in ("string", "bytes", "records"):
        n = r.length(compact, wide=kind != "string")
        if n == -1 and (nullable or kind == "records"):
            return None
        if n < 0:
            raise Malformed(f"{field[NAME]}: bad length {n}")
        raw = r.take(n)
        if kind != "string":
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed(f"{field[NAME]}: not UTF-8") from None
    if kind == "{}":
        return _read_struct(r, field[FIELDS], version, flexible)
    if kind.startswith("[]"):
        n = r.length(compact, wide=True)
        if n == -1 and nullable:
            return None
        if n < 0 or n > r.left():  # every element takes at least one byte
            raise Malformed(f"{field[NAME]}: bad array length {n}")
        element = kind[2:]
        if not element:
            return [_read_struct(r, field[FIELDS], version, flexible) for _ in range(n)]
        return [_read_value(r, field, element, version, flexible) for _ in range(n)]
    raise Malformed(f"{field[NAME]}: unknown type {kind}")


def _read_struct(r: Reader, fields: tuple, version: int, flexible: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in fields:
        if field[TAGGED] or not _within(field[VERSIONS], version):
            continue
        out[field[NAME]] = _read_value(r, field, field[TYPE], version, flexible)
    if flexible:
        tags = read_tags(r)
        if tags:
            out[TAGS] = tags
    return out


def decode(api_key: int, kind: str, version: int, body: bytes | memoryview) -> dict[str, Any]:
    """The whole body of a request or response (after its header): Malformed unless
    every byte belongs to a field."""
    found = MESSAGES.get((api_key, kind))
    if found is None:
        raise Malformed(f"api key {api_key} is not known")
    name, span, flexible_from, fields = found
    if not span[0] <= version <= span[1]:
        raise Malformed(f"{name} v{version} is not a known version ({span[0]}-{span[1]})")
    r = Reader(body)
    value = _read_struct(r, fields, version, flexible_from is not None
                         and version >= flexible_from)
    if r.left():
        raise Malformed(f"{name} v{version}: {r.left()} bytes after the last field")
    return value


def topics_in(api_key: int, kind: str, version: int, value: dict[str, Any]) -> list[str | None]:
    """Every topic name the message carries, in order; None stands for topics that
    cannot be named: named by id only, or a null list meaning every topic."""
    found = MESSAGES.get((api_key, kind))
    return list(_topics(found[3], value, version)) if found else []


def _names_topics(fields: tuple) -> bool:
    return any(f[TOPIC] or (f[FIELDS] is not None and _names_topics(f[FIELDS]))
               for f in fields)


def _topics(fields: tuple, value: dict[str, Any], version: int) -> Iterator[str | None]:
    for field in fields:
        if field[NAME] not in value:
            continue
        v = value[field[NAME]]
        if field[TOPIC]:
            if isinstance(v, list):
                yield from v
            else:
                yield v
        elif field[FIELDS] is not None and v is None:
            if _names_topics(field[FIELDS]):
                yield None  # a null topic list means "every topic" (Metadata, OffsetFetch)
        elif field[FIELDS] is not None:
            # a struct that names its topic in other versions but not in this one (Fetch
            # v13+: by id only) names a topic nobody can match by name
            by_id = any(f[TOPIC] and f[NAME] not in (v[0] if isinstance(v, list) and v
                                                     else v if isinstance(v, dict) else {})
                        for f in field[FIELDS])
            for item in (v if isinstance(v, list) else [v]):
                if by_id:
                    yield None
                yield from _topics(field[FIELDS], item, version)


# writing -----------------------------------------------------------------------------------

def uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length(n: int, compact: bool, wide: bool) -> bytes:
    if compact:
        return uvarint(n + 1)
    return (_I32 if wide else _I16).pack(n)


def _zero(field: tuple, kind: str, version: int) -> Any:
    if field[DEFAULT] is not None:
        return field[DEFAULT]
    if _within(field[NULLABLE], version) and kind in ("string", "bytes", "records"):
        return None
    if kind in _SCALARS:
        return 0
    return {"bool": False, "uuid": uuid.UUID(int=0), "string": "", "bytes": b"",
            "records": None, "{}": {}}.get(kind, [])


def _write_value(out: bytearray, field: tuple, kind: str, value: Any, version: int,
                 flexible: bool) -> None:
    compact = flexible and not field[NEVER_COMPACT]
    found = _SCALARS.get(kind)
    if found is not None:
        out += found.pack(value)
    elif kind == "bool":
        out += _I8.pack(1 if value else 0)
    elif kind == "uuid":
        out += value.bytes
    elif kind in ("string", "bytes", "records"):
        if value is None:
            out += _length(-1, compact, wide=kind != "string")
            return
        raw = value.encode("utf-8") if kind == "string" else bytes(value)
        out += _length(len(raw), compact, wide=kind != "string")
        out += raw
    elif kind == "{}":
        _write_struct(out, field[FIELDS], value, version, flexible)
    elif kind.startswith("[]"):
        if value is None:
            out += _length(-1, compact, wide=True)
            return
        out += _length(len(value), compact, wide=True)
        for item in value:
            if kind == "[]":
                _write_struct(out, field[FIELDS], item, version, flexible)
            else:
                _write_value(out, field, kind[2:], item, version, flexible)
    else:
        raise ValueError(f"{field[NAME]}: unknown type {kind}")


def _write_struct(out: bytearray, fields: tuple, value: dict[str, Any], version: int,
                  flexible: bool) -> None:
    for field in fields:
        if field[TAGGED] or not _within(field[VERSIONS], version):
            continue
        kind = field[TYPE]
        v = value.get(field[NAME]) if field[NAME] in value else _zero(field, kind, version)
        _write_value(out, field, kind, v, version, flexible)
    if flexible:
        out += value.get(TAGS) or b"\x00"  # the tagged fields read, or none


def encode(api_key: int, kind: str, version: int, value: dict[str, Any]) -> bytes:
    """A body from `value`; absent fields take their default (0, "", [], null or the
    schema's own default)."""
    name, span, flexible_from, fields = MESSAGES[(api_key, kind)]
    if not span[0] <= version <= span[1]:
        raise ValueError(f"{name} v{version} is not a known version")
    out = bytearray()
    _write_struct(out, fields, value, version, flexible_from is not None
                  and version >= flexible_from)
    return bytes(out)


def response_frame(api_key: int, version: int, correlation_id: int, body: bytes) -> bytes:
    """size + response header + body."""
    head = _I32.pack(correlation_id)
    if response_header_flexible(api_key, version):
        head += b"\x00"
    return _I32.pack(len(head) + len(body)) + head + body


def request_frame(api_key: int, version: int, correlation_id: int, client_id: str | None,
                  body: bytes) -> bytes:
    """size + request header (v1, or v2 for flexible versions) + body: for tests/tools."""
    head = _I16.pack(api_key) + _I16.pack(version) + _I32.pack(correlation_id)
    if client_id is None:
        head += _I16.pack(-1)
    else:
        raw = client_id.encode()
        head += _I16.pack(len(raw)) + raw
    if is_flexible(api_key, version):
        head += b"\x00"
    return _I32.pack(len(head) + len(body)) + head + body
