"""DNS rules (`toPorts[].rules.dns`) and `toFQDNs` selectors, as Cilium's `api.PortRuleDNS`
and `api.FQDNSelector`. Parsed and validated; enforcement needs the DNS proxy (later)."""

from __future__ import annotations

import attrs


@attrs.frozen
class FQDNSelector:
    match_name: str = ""
    match_pattern: str = ""

    def __str__(self) -> str:
        return self.match_name or self.match_pattern


#: the same two fields, used as an L7 rule on port 53
PortRuleDNS = FQDNSelector
