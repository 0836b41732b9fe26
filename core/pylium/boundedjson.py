"""Bounded JSON: the JSON half of `pylium.documents` (see its docstring for the bounds),
kept apart because it needs nothing but the standard library — `pylium-cni`, exec'd for
every pod, reads its config with it without importing PyYAML (~20 ms per exec).
`pylium.documents` re-exports everything here."""

from __future__ import annotations

import codecs
import json

from pylium.errors import UserError

#: `typing` costs milliseconds at import and `pylium-cni` is exec'd for every pod: the
#: names below are for type checkers only (they treat any `TYPE_CHECKING` as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


class DocumentError(UserError):
    """Input that cannot be read as a bounded YAML/JSON document; the message is one line."""


class LimitExceeded(DocumentError):
    """Input over one of the bounds (size, depth, expanded nodes): no other reading of it
    (JSON failed, try YAML) should be attempted."""


def decode_text(data: bytes, what: str = "input") -> str:
    """Bytes to text: UTF-8 unless a BOM says UTF-16/32; otherwise name the first bad byte."""
    if len(data) > MAX_BYTES:
        raise LimitExceeded(f"{what}: {len(data)} bytes is more than the limit of {MAX_BYTES}")
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise DocumentError(f"{what}: not {encoding.upper().removesuffix('-SIG')} text "
                            f"(byte 0x{bad} at offset {exc.start}); save it as UTF-8"
                            ) from None


def check_depth(value: Any, what: str = "input", limit: int = MAX_DEPTH) -> None:
    """Refuse data nested deeper than `limit` lists/mappings (walks without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            raise LimitExceeded(f"{what}: nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: one decoder for every call (`json.loads` with an option builds a new one each time)
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def load_json(text: str | bytes, what: str = "input") -> Any:
    """One JSON value, bounded like everything here; `DocumentError` otherwise."""
    if isinstance(text, bytes):
        text = decode_text(text, what)
    elif len(text) > MAX_BYTES:
        raise LimitExceeded(f"{what}: {len(text)} characters is more than the limit of "
                            f"{MAX_BYTES}")
    try:
        if text.startswith("\ufeff"):  # as `json.loads` says
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)",
                                       text, 0)
        value = _DECODER.decode(text)
    except RecursionError:
        raise LimitExceeded(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise DocumentError(f"{what}: not valid JSON: {exc}") from None
    # nesting needs an opening bracket per level: with few of them, however placed (in
    # strings too), the depth is within the limit without walking (KV records, read by
    # every node about every node, are the common case)
    if text.count("[") + text.count("{") > MAX_DEPTH:
        check_depth(value, what)
    return value
