"""A new endpoint's policy map prepared ahead (`Datapath.prepare_policy`): the empty map in
its slot drops everything (no meta entry: DROP_NO_CONFIG) until the first policy, which is
written into that very map — entries first, meta entry last, no swap of the outer slot (so
no RCU grace period on the way to the pod's first packet); later policies are swapped in
whole as before, and the prepared map goes with the endpoint."""

from __future__ import annotations

import pytest
from pylium.datapath.datapath import MapFull
from pylium.datapath.maps.metrics import U32Key
from pylium.policy.mapstate import PROTO_TCP

from .test_map_full import A, B, _ports, small_node  # noqa: F401  (the fixture)

NO_CONFIG = "No configuration available to perform policy decision"


def _slot(n, ep_id: int) -> int | None:
    """The id of the map in the endpoint's outer slot."""
    value = n.worker.run(n.dp.policy.lookup, U32Key(ep_id))
    return None if value is None else value.value


def test_a_prepared_map_drops_until_its_first_policy_is_filled_in_place(small_node):  # noqa: F811
    n = small_node
    b = n.eps["b"].ep_id
    trace = lambda port: n.worker.run(n.dp.trace, b, "ingress", A[0], B[0], 40000, port,  # noqa: E731
                                      PROTO_TCP)
    assert _slot(n, b) is None and trace(80)["action"] == "dropped"
    assert n.worker.run(n.dp.prepare_policy, b) is True
    prepared = _slot(n, b)
    assert prepared is not None
    assert n.worker.run(n.dp.prepare_policy, b) is False  # prepared already: left as it is
    assert n.worker.run(n.dp.dump_policy, b)["entries"] == []
    assert trace(80)["action"] == "dropped" and trace(90)["action"] == "dropped"
    assert trace(80)["drop_reason_desc"] == NO_CONFIG
    # a policy too big for the map is refused before anything is written: still empty
    with pytest.raises(MapFull):
        n.worker.run(n.dp.update_policy, b, _ports(range(90, 98), 1))
    assert _slot(n, b) == prepared and trace(80)["drop_reason_desc"] == NO_CONFIG
    # the first policy lands in the prepared map itself
    assert n.worker.run(n.dp.update_policy, b, _ports([80], 1)) == 1
    assert _slot(n, b) == prepared
    assert trace(80)["verdict"] == "allowed" and trace(90)["action"] == "dropped"
    # the next one is a whole new map swapped in
    assert n.worker.run(n.dp.update_policy, b, _ports([90], 2)) == 2
    assert _slot(n, b) not in (None, prepared)
    assert trace(90)["verdict"] == "allowed" and trace(80)["action"] == "dropped"


def test_a_prepared_map_goes_with_its_endpoint(small_node):  # noqa: F811
    n = small_node
    a, b = n.eps["a"].ep_id, n.eps["b"].ep_id
    assert n.worker.run(n.dp.prepare_policy, a) and n.worker.run(n.dp.prepare_policy, b)
    assert n.worker.run(n.dp.release_policy, a) is True
    assert _slot(n, a) is None and n.worker.run(n.dp.release_policy, a) is False
    assert n.worker.run(n.dp.detach_endpoint, b) is True
    assert _slot(n, b) is None
    assert n.dp._fresh_policy == {}  # no fd kept for either


def test_preparing_replaces_a_dead_endpoints_policy_left_in_the_slot(small_node):  # noqa: F811
    """An id handed to a new endpoint whose slot still holds a map (an agent died before
    removing it): the new endpoint never runs under that old policy."""
    n = small_node
    b = n.eps["b"].ep_id
    trace = lambda port: n.worker.run(n.dp.trace, b, "ingress", A[0], B[0], 40000, port,  # noqa: E731
                                      PROTO_TCP)
    n.worker.run(n.dp.update_policy, b, _ports([80], 1))
    old = _slot(n, b)
    assert trace(80)["verdict"] == "allowed"
    assert n.worker.run(n.dp.prepare_policy, b) is True
    assert _slot(n, b) not in (None, old)
    assert trace(80)["drop_reason_desc"] == NO_CONFIG
    n.worker.run(n.dp.update_policy, b, _ports([90], 2))
    assert trace(90)["verdict"] == "allowed" and trace(80)["action"] == "dropped"


def test_policy_in_place_names_the_prepared_map_only(small_node):  # noqa: F811
    """What a create polls while `prepare_policy` sleeps through its grace period: true once
    the prepared map is in the slot, false for an empty slot or another map."""
    n = small_node
    b = n.eps["b"].ep_id
    assert n.worker.run(n.dp.policy_in_place, b) is False  # empty slot
    n.worker.run(n.dp.update_policy, b, _ports([80], 1))
    assert n.worker.run(n.dp.policy_in_place, b) is False  # a map, not a prepared one
    n.worker.run(n.dp.prepare_policy, b)
    assert n.worker.run(n.dp.policy_in_place, b) is True
    n.worker.run(n.dp.update_policy, b, _ports([90], 2))  # filled in place: still it
    assert n.worker.run(n.dp.policy_in_place, b) is True
    n.worker.run(n.dp.release_policy, b)
    assert n.worker.run(n.dp.policy_in_place, b) is False
