"""Ports, protocols, ICMP and the L7 rule container, as Cilium's `api.PortRule`."""

from __future__ import annotations

from typing import NewType

import attrs

from pylium.policy.dns import PortRuleDNS
from pylium.policy.http import PortRuleHTTP
from pylium.policy.kafka import PortRuleKafka

#: a port number ("80") or an IANA service name ("http"), validated by the parser
PortValue = NewType("PortValue", str)
#: TCP, UDP, SCTP, ANY (and the host-policy protocols ICMP, ICMPv6, VRRP, IGMP)
ProtocolName = NewType("ProtocolName", str)
IcmpType = NewType("IcmpType", int)

PORT_PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ANY": 0,
                  "ICMP": 1, "ICMPV6": 58, "VRRP": 112, "IGMP": 2}
#: protocols that carry ports; ANY with a port means these three (as Cilium does)
PORTED = ("TCP", "UDP", "SCTP")


@attrs.frozen
class PortProtocol:
    port: PortValue = PortValue("0")
    end_port: int = 0
    protocol: ProtocolName = ProtocolName("ANY")

    @property
    def is_named(self) -> bool:
        return not self.port.isdigit()

    def __str__(self) -> str:
        span = f"-{self.end_port}" if self.end_port and self.end_port != int(
            self.port if self.port.isdigit() else 0) else ""
        return f"{self.port}{span}/{self.protocol}"


@attrs.frozen
class L7Rules:
    http: tuple[PortRuleHTTP, ...] = ()
    kafka: tuple[PortRuleKafka, ...] = ()
    dns: tuple[PortRuleDNS, ...] = ()

    @property
    def kind(self) -> str:
        """"http", "kafka", "dns" or "" (no L7 rules)."""
        return "http" if self.http else "kafka" if self.kafka else "dns" if self.dns else ""

    @property
    def rules(self) -> tuple:
        return self.http or self.kafka or self.dns


@attrs.frozen
class PortRule:
    ports: tuple[PortProtocol, ...] = ()
    rules: L7Rules | None = None

    @property
    def l7(self) -> L7Rules | None:
        return self.rules if self.rules is not None and self.rules.kind else None


@attrs.frozen
class PortDenyRule:
    ports: tuple[PortProtocol, ...] = ()
    rules = None
    l7 = None


@attrs.frozen
class ICMPField:
    type: IcmpType
    family: str = "IPv4"


@attrs.frozen
class ICMPRule:
    fields: tuple[ICMPField, ...] = ()
