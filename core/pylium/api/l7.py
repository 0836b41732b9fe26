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
        self.options = dict(options or {})

    @abc.abstractmethod
    def judge(self, rules: list[Any], request: L7Request) -> L7Verdict:
        """Decide one request against the L7 rules that apply to its connection."""

    @abc.abstractmethod
    async def start(self, proxy_port: int) -> None:
        """Start the proxy listening on `proxy_port`."""

    @abc.abstractmethod
    async def stop(self) -> None: ...
