"""Reading YAML and JSON that someone else wrote (policy files, config files, API bodies,
records read back from the KV store), with bounds, so that hostile input gets one clear line
instead of a crash, a hang or a traceback.

Bounds, all refused with a `DocumentError` (a `UserError`) naming what was exceeded:
- size: `MAX_BYTES` (the API's body limit too);
- text: UTF-8 (with or without a BOM), or UTF-16/UTF-32 with a BOM as YAML allows;
  anything else names the first bad byte and its offset;
- nesting: `MAX_DEPTH` levels of lists/mappings, counted after YAML aliases are expanded
  (deeper input makes Python's recursive parsers fail: PyYAML's composer raises
  RecursionError, libyaml's C composer even overflows the C stack, so only the pure-Python
  loader below, which stops at the limit, is used);
- aliases: the document with every alias expanded must stay under `MAX_NODES` nodes
  (the "billion laughs" document is a few hundred bytes that expand to 10^9 nodes; PyYAML
  shares the aliased objects so parsing is fast, but everything that walks the result
  afterwards would not be), and an alias may not refer to a node that contains it.

YAML timestamps stay strings, as Kubernetes' YAML-to-JSON reading keeps them: a label value
`2024-01-01` is text, not a date."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

try:
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - PyYAML wheels ship libyaml
    CParser = None

from pylium.boundedjson import (  # noqa: F401 - re-exported: one place for bounded reading
    MAX_BYTES,
    MAX_DEPTH,
    DocumentError,
    LimitExceeded,
    check_depth,
    decode_text,
    load_json,
)
from pylium.errors import one_line

MAX_NODES = 1_000_000


class _Bounded(Composer, SafeConstructor, Resolver):
    """PyYAML's safe loading with events from libyaml's C parser (fast and lazy: the
    pure-Python scanner looks ahead over a whole run of `[[[[` before it yields a token,
    seconds for a few KB) composed here in Python, stopping at `MAX_DEPTH` (libyaml's own
    C composer recurses without a bound and overflows the C stack). Timestamps stay text."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in Resolver.yaml_implicit_resolvers.items()}

    def _bounded_init(self, what: str) -> None:
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._what = what

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise LimitExceeded(f"{self._what}: line {line}: nested deeper than "
                                    f"{MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Bounded.add_constructor("tag:yaml.org,2002:timestamp", SafeConstructor.construct_scalar)

if CParser is not None:
    class _BoundedLoader(_Bounded, CParser):
        def __init__(self, stream: str, what: str):
            CParser.__init__(self, stream)
            self._bounded_init(what)
else:  # PyYAML built without libyaml: correct, slower on deep flow collections
    class _BoundedLoader(_Bounded, Reader, Scanner, Parser):
        def __init__(self, stream: str, what: str):
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)
            self._bounded_init(what)


def _expanded(node: Node, what: str) -> None:
    """Refuse a composed node graph that is too deep or too big once aliases are expanded,
    or whose alias points back into itself. Each distinct node is sized once."""
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, depth) expanded
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        current, done = stack.pop()
        key = id(current)
        children: list[Node]
        if isinstance(current, SequenceNode):
            children = list(current.value)
        elif isinstance(current, MappingNode):
            children = [n for pair in current.value for n in pair]
        else:
            sizes[key] = (1, 0)
            continue
        if done:
            open_.discard(key)
            count = 1 + sum(sizes[id(c)][0] for c in children)
            depth = 1 + max((sizes[id(c)][1] for c in children), default=0)
            if count > MAX_NODES:
                raise LimitExceeded(f"{what}: aliases expand to more than {MAX_NODES} nodes")
            if depth > MAX_DEPTH:
                raise LimitExceeded(f"{what}: nested deeper than {MAX_DEPTH} levels "
                                    "once aliases are expanded")
            sizes[key] = (count, depth)
            continue
        if key in sizes:
            continue
        if key in open_:
            raise DocumentError(f"{what}: line {current.start_mark.line + 1}: an alias refers "
                                "to a node that contains it")
        open_.add(key)
        stack.append((current, True))
        for child in children:
            if id(child) in open_:
                raise DocumentError(f"{what}: line {child.start_mark.line + 1}: an alias "
                                    "refers to a node that contains it")
            if id(child) not in sizes:
                stack.append((child, False))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}not valid YAML or JSON: {' '.join(str(problem).split())}"


def load_yaml_all(text: str | bytes, what: str = "input") -> list[Any]:
    """Every document of a YAML stream (empty documents left out), bounded."""
    if isinstance(text, bytes):
        text = decode_text(text, what)
    elif len(text) > MAX_BYTES:
        raise LimitExceeded(f"{what}: {len(text)} characters is more than the limit of "
                            f"{MAX_BYTES}")
    docs: list[Any] = []
    loader = None
    try:
        loader = _BoundedLoader(text, what)  # its reader refuses control characters here
        while loader.check_node():
            node = loader.get_node()
            _expanded(node, what)
            try:
                value = loader.construct_document(node)
            except (ValueError, TypeError, OverflowError, AttributeError, LookupError) as exc:
                # e.g. an int of more digits than Python converts, a bad !!binary, and
                # whatever else PyYAML's constructors let through
                raise DocumentError(f"{what}: line {node.start_mark.line + 1}: cannot read a "
                                    f"value: {' '.join(str(exc).split())}") from None
            if value is not None:
                docs.append(value)
    except yaml.YAMLError as exc:
        raise DocumentError(f"{what}: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise LimitExceeded(f"{what}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()
    return docs


def load_yaml(text: str | bytes, what: str = "input") -> Any:
    """One YAML document (None when empty); more than one is refused."""
    docs = load_yaml_all(text, what)
    if len(docs) > 1:
        raise DocumentError(f"{what}: expected one YAML document, found {len(docs)}")
    return docs[0] if docs else None


class RecordError(ValueError):
    """A KV-store record this agent cannot read (another version's, a hostile peer's):
    whoever reads it skips it with a log line; it never stops a watch or the agent."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def load_record(raw: bytes, what: str) -> Any:
    """A JSON record read back from the KV store, bounded like any untrusted document."""
    try:
        return load_json(bytes(raw), what)
    except DocumentError as exc:
        raise RecordError(str(exc)) from None
