"""L7 parser contract: a proxy for one protocol that enforces L7 rules per request."""

from __future__ import annotations

import abc
from typing import Any

import attrs


@attrs.frozen
class L7Request:
    """One parsed request, protocol-specific fields in `fields` (e.g. method, path)."""

    protocol: str
    fields: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class L7Verdict:
    allowed: bool
    reason: str = ""


class L7Parser(abc.ABC):
    """Parses one protocol and judges each request against the rules of the L4 entry that
    redirected the connection to the proxy (known from the policy map's proxy port)."""

    #: the `rules.<protocol>` key in CiliumNetworkPolicy this parser serves, e.g. "http"
    protocol: str = ""

    def __init__(self, context: Any, options: dict[str, Any] | None = None):
        self.context = context
        self.options = dict(options if options is not None else getattr(context, "options", {}))

    @classmethod
    def from_context(cls, context: Any) -> L7Parser:
        """How the core builds the backend from a `pylium.api.context.L7Context`."""
        return cls(context, dict(context.options))

    @abc.abstractmethod
    def judge(self, rules: list[Any], request: L7Request) -> L7Verdict:
        """Decide one request against the L7 rules that apply to its connection."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start (or adopt) the proxy on the context's `proxy_ports`."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def served_ports(self) -> set[int]:
        """Proxy ports a healthy proxy listens on right now. Redirects to any other port
        load as deny (fail closed), so answer honestly: a dead proxy serves nothing."""

    def teardown(self) -> None:  # noqa: B027 - optional: a parser may leave nothing behind
        """Deselected: remove what an earlier run left on the node (e.g. a proxy process
        that outlives the agent). The core calls it on a freshly built backend, never
        started, at the first agent start without this parser."""

    def status(self) -> dict[str, Any]:
        return {}
