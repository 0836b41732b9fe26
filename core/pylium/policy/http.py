"""HTTP rules (`toPorts[].rules.http`), as Cilium's `api.PortRuleHTTP`. Method, path and host
are extended POSIX regular expressions matched against the whole value."""

from __future__ import annotations

import re

import attrs


@attrs.frozen
class HeaderMatch:
    name: str
    value: str = ""


@attrs.frozen
class PortRuleHTTP:
    method: str = ""
    path: str = ""
    host: str = ""
    #: "Name" (must be present) or "Name: value" (must have that value)
    headers: tuple[str, ...] = ()
    header_matches: tuple[HeaderMatch, ...] = ()

    def matches(self, method: str = "", path: str = "", host: str = "",
                headers: dict[str, str] | None = None) -> bool:
        """Does one request satisfy this rule? (An empty rule allows every request.)"""
        for pattern, value in ((self.method, method), (self.path, path), (self.host, host)):
            if pattern and re.fullmatch(pattern, value or "") is None:
                return False
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        for header in self.headers:
            name, sep, want = header.partition(":")
            have = lowered.get(name.strip().lower())
            if have is None or (sep and have != want.strip()):
                return False
        for match in self.header_matches:
            have = lowered.get(match.name.lower())
            if have is None or (match.value and have != match.value):
                return False
        return True
