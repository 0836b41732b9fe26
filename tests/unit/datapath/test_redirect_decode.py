"""How a program's answer about a flow sent to the L7 proxy reads (`pylium bpf trace`,
`policy trace --datapath`): action `to-proxy` with the proxy port, not a target ifindex."""

from __future__ import annotations

from pylium.datapath.packet import SkBuff
from pylium.datapath.testrun import (
    TARGET_PROXY,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    decode_result,
)
from pylium.policy.mapstate import Direction

REDIRECT_10080 = 3 | (10080 << 16)


def ctx(*cb: int) -> SkBuff:
    out = SkBuff()
    for i, value in enumerate(cb):
        out.cb[i] = value
    return out


def test_egress_to_proxy_is_reported_with_its_port():
    r = decode_result(TC_ACT_OK, ctx(0, REDIRECT_10080, 256, 0, TARGET_PROXY),
                      "from_container", Direction.EGRESS)
    assert (r["action"], r["verdict"], r["proxy_port"], r["target_ifindex"]) == (
        "to-proxy", "redirected", 10080, 0)


def test_ingress_hairpin_to_proxy_is_not_a_bpf_redirect_to_a_peer():
    r = decode_result(TC_ACT_REDIRECT, ctx(0, REDIRECT_10080, 256, 0, TARGET_PROXY),
                      "to_container", Direction.INGRESS)
    assert (r["action"], r["proxy_port"]) == ("to-proxy", 10080)
    peer = decode_result(TC_ACT_REDIRECT, ctx(0, 1, 256, 0, 7), "from_container",
                         Direction.EGRESS)
    assert (peer["action"], peer["target_ifindex"]) == ("redirected", 7)


def test_a_redirect_without_a_proxy_socket_is_a_drop():
    r = decode_result(TC_ACT_SHOT, ctx(178, REDIRECT_10080, 256, 0, TARGET_PROXY),
                      "from_container", Direction.EGRESS)
    assert (r["action"], r["drop_reason"], r["drop_reason_desc"]) == (
        "dropped", 178, "Socket lookup failed")
