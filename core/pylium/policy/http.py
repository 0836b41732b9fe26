"""HTTP rules (`toPorts[].rules.http`), as Cilium's `api.PortRuleHTTP`. Method, path and host
are extended POSIX regular expressions matched against the whole value (anchored, as the
Envoy filter Cilium configures matches them); header names match case-insensitively, header
values exactly.

`headerMatches[].mismatch`: empty = the header must have the value or the rule does not
match; `LOG` = the rule matches anyway and the mismatch is reported with the request.
ADD/DELETE/REPLACE (rewrite the request) and `secret` are refused when the policy is read."""

from __future__ import annotations

import functools
import re

import attrs

#: mismatch actions pylium enforces; the others are refused by the policy parser
SUPPORTED_MISMATCH = ("", "LOG")
MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@attrs.frozen
class HeaderMatch:
    name: str
    value: str = ""
    mismatch: str = ""


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
        return self.check(method, path, host, headers) is not None

    def check(self, method: str = "", path: str = "", host: str = "",
              headers: dict[str, str] | None = None) -> list[str] | None:
        """None if the rule does not match the request; else the header mismatches it
        logs (`headerMatches` with `mismatch: LOG`), usually []."""
        for pattern, value in ((self.method, method), (self.path, path), (self.host, host)):
            if pattern and _compiled(pattern).fullmatch(value or "") is None:
                return None
        if not (self.headers or self.header_matches):
            return []  # the usual rule: nothing about headers
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        for header in self.headers:
            name, sep, want = header.partition(":")
            have = lowered.get(name.strip().lower())
            if have is None or (sep and have != want.strip()):
                return None
        logged = []
        for match in self.header_matches:
            have = lowered.get(match.name.lower())
            if have is None or (match.value and have != match.value):
                if match.mismatch != "LOG":
                    return None
                logged.append(match.name)
        return logged
