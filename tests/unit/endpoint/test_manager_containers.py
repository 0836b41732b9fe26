"""Endpoints keyed by container id (what CNI ADD/DEL/GC ask for), with the netlink plumbing
replaced by the fake of test_manager: idempotent creates, deletes racing them, GC, restore
of container endpoints, and regeneration that skips unchanged maps."""

from __future__ import annotations

import asyncio
import threading

import pytest
from pylium.endpoint import manager as manager_mod
from pylium.endpoint.model import host_ifname
from pylium.errors import Conflict, UserError

from .test_manager import (
    links,  # noqa: F401  (fixture)
    make,
    run,
)


def test_create_by_container_is_idempotent(tmp_path, links):  # noqa: F811
    created = []
    mgr, _ = make(tmp_path, on_created=created.append)

    async def go():
        first, new1 = await mgr.create_endpoint("web", "shop", {}, "pod-a",
                                                container_id="abc", pod_ifname="net1")
        again, new2 = await mgr.create_endpoint("web", "shop", {}, "pod-a",
                                                container_id="abc", pod_ifname="net1")
        return first, new1, again, new2

    first, new1, again, new2 = run(go())
    assert (new1, new2) == (True, False) and first == again
    assert first.ifname == host_ifname("shop", "web", "abc") != host_ifname("shop", "web")
    assert first.pod_ifname == "net1" and first.ipam_owner == "container:abc"
    assert mgr.ipam.allocated() == {first.ipv4: "container:abc"}
    assert len(created) == 1 and mgr.find_container("abc") == first
    # the same container with another interface or netns is refused (409: try later)
    with pytest.raises(Conflict):
        run(mgr.create_endpoint("web", "shop", {}, "pod-a", container_id="abc",
                                pod_ifname="eth0"))
    with pytest.raises(Conflict):
        run(mgr.create_endpoint("web", "shop", {}, "pod-b", container_id="abc",
                                pod_ifname="net1"))
    # another container under the same pod name while the first lives: try later
    with pytest.raises(Conflict, match="try again"):
        run(mgr.create_endpoint("web", "shop", {}, "pod-b", container_id="def"))
    for bad in ({"container_id": "../x"}, {"pod_ifname": "a/b"}, {"pod_ifname": "x" * 16}):
        with pytest.raises(UserError):
            run(mgr.create_endpoint("w2", "shop", {}, "pod-c", **bad))
    assert len(mgr.list()) == 1


def test_a_dead_sandbox_makes_way_for_its_successor(tmp_path, links, monkeypatch):  # noqa: F811
    deleted = []
    mgr, _ = make(tmp_path, on_deleted=deleted.append)
    old = run(mgr.create("web", "shop", {}, "pod-old", container_id="old"))
    monkeypatch.setattr(manager_mod.plumbing, "netns_exists", lambda ns: ns != "pod-old")
    new = run(mgr.create("web", "shop", {}, "pod-new", container_id="new"))
    assert [e.container_id for e in mgr.list()] == ["new"] and deleted == [old]
    assert mgr.ipam.allocated() == {new.ipv4: "container:new"}


def test_delete_container_is_idempotent_and_respects_ifname(tmp_path, links):  # noqa: F811
    mgr, parts = make(tmp_path)
    ep = run(mgr.create("a", "default", {}, "pod-a", container_id="c1"))
    assert run(mgr.delete_container("c1", "eth1")) is None and mgr.find_container("c1")
    assert run(mgr.delete_container("c1", "eth0")) == ep
    assert run(mgr.delete_container("c1")) is None
    assert mgr.list() == [] and mgr.ipam.allocated() == {} and parts["datapath"].attached == {}
    # an address a create took before dying half way is freed by the DEL too
    mgr.ipam.allocate("container:half")
    assert run(mgr.delete_container("half")) is None and mgr.ipam.allocated() == {}


def test_a_del_after_an_abandoned_add_deletes_what_it_made(tmp_path, links):  # noqa: F811
    """Cilium #9913: the runtime gave up on an ADD the agent had not got to yet and sent
    DEL. Creates and deletes run in arrival order: the DEL removes what the late ADD made,
    the ADD answers 409, and nothing (no IP) is left that nobody would delete."""
    mgr, _ = make(tmp_path)

    async def go():
        await mgr._lock.acquire()  # the agent is busy with something else
        late = asyncio.create_task(mgr.create("a", "default", {}, "pod-a", container_id="c9"))
        await asyncio.sleep(0)
        delete = asyncio.create_task(mgr.delete_container("c9"))
        await asyncio.sleep(0)
        mgr._lock.release()
        with pytest.raises(Conflict, match="deleted while"):
            await late
        gone = await delete
        # a new ADD after the DEL is a new attempt: it works
        again = await mgr.create("a", "default", {}, "pod-a", container_id="c9")
        return gone, again

    gone, again = run(go())
    assert gone is not None and gone.container_id == "c9" and mgr.list() == [again]
    assert mgr.ipam.allocated() == {again.ipv4: "container:c9"}


def test_gc_keeps_valid_attachments_and_lab_endpoints(tmp_path, links):  # noqa: F811
    mgr, _ = make(tmp_path)
    keep = run(mgr.create("k", "default", {}, "pod-k", container_id="keep"))
    run(mgr.create("s", "default", {}, "pod-s", container_id="stale"))
    other_if = run(mgr.create("o", "default", {}, "pod-o", container_id="oif",
                              pod_ifname="net1"))
    lab = run(mgr.create("lab", "default", {}, "pod-lab"))
    leaked = mgr.ipam.allocate("container:crashed")
    result = run(mgr.gc({("keep", "eth0"), ("oif", "eth0")}))
    assert sorted(e.name for e in mgr.list()) == ["k", "lab"]
    assert result["released"] == [leaked] and len(result["deleted"]) == 2
    assert set(mgr.ipam.allocated()) == {keep.ipv4, lab.ipv4}
    assert other_if.id in result["deleted"]


def test_restore_adopts_container_endpoints_and_frees_their_leaks(tmp_path, links):  # noqa: F811
    mgr, _ = make(tmp_path)
    ep = run(mgr.create("a", "default", {}, "pod-a", container_id="c1", pod_ifname="net0"))
    mgr.ipam.allocate("container:died-mid-create")
    again, _ = make(tmp_path)
    again.ipam = mgr.ipam
    assert run(again.restore())["adopted"] == [ep.id]
    got = again.find_container("c1")
    assert (got.ipv4, got.pod_ifname, got.container_id) == (ep.ipv4, "net0", "c1")
    assert again.ipam.allocated() == {ep.ipv4: "container:c1"}


def test_regeneration_skips_maps_that_would_not_change(tmp_path, links):  # noqa: F811
    mgr, parts = make(tmp_path)
    loads = []
    update = parts["datapath"].update_policy

    async def counting(ep, policy):
        loads.append(ep.id)
        await update(ep, policy)

    parts["datapath"].update_policy = counting
    for i in range(5):
        run(mgr.create(f"p{i}", "default", {}, f"pod-{i}", container_id=f"c{i}"))
    assert sorted(loads) == [1, 2, 3, 4, 5]  # each map loaded once, not once per create
    parts["policy"].revision = 7
    run(mgr.regenerate_all("policy change"))
    assert sorted(loads) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert {e.policy_revision for e in mgr.list()} == {7}


def test_pods_are_wired_side_by_side_and_in_flight_claims_are_respected(tmp_path, links,  # noqa: F811
                                                                       monkeypatch):
    """Two ADDs wire their veths at the same time (the fake's barrier needs both inside
    at once, or it breaks: the manager's lock does not serialise them; the agent wires on
    one netlink thread, here two); while they are under way, a third create for one of
    their names or netns is a 409, and neither id nor address is handed out twice."""
    mgr, _ = make(tmp_path, netlink_threads=2)
    barrier = threading.Barrier(2, timeout=10)
    wire = links.wire

    def wire_together(*args, **kwargs):
        barrier.wait()
        return wire(*args, **kwargs)

    monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", wire_together)

    async def go():
        first = asyncio.create_task(mgr.create("a", "default", {}, "pod-a", container_id="c1"))
        second = asyncio.create_task(mgr.create("b", "default", {}, "pod-b", container_id="c2"))
        while len(mgr._creating) < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(Conflict, match="being created"):
            await mgr.create("a", "default", {}, "pod-x", container_id="c3")
        with pytest.raises(Conflict, match="being created"):
            await mgr.create("x", "default", {}, "pod-b", container_id="c4")
        return await first, await second

    a, b = run(go())
    assert a.id != b.id and a.ipv4 != b.ipv4
    assert sorted(e.container_id for e in mgr.list()) == ["c1", "c2"]
    assert set(mgr.ipam.allocated()) == {a.ipv4, b.ipv4} and not mgr._creating
    # and both are deleted side by side too, leaving nothing
    async def delete_both():
        return await asyncio.gather(mgr.delete_container("c1"), mgr.delete_container("c2"))

    assert sorted(e.id for e in run(delete_both())) == sorted([a.id, b.id])
    assert mgr.list() == [] and mgr.ipam.allocated() == {} and not mgr._deleting
    assert sorted(p.name for p in (tmp_path / "endpoints").iterdir()) == []


def test_pods_started_together_share_address_allocations(tmp_path, links,  # noqa: F811
                                                         monkeypatch):
    """Addresses are allocated off the netlink thread, the creates asking meanwhile in one
    batch (one IPAM state write); a pod whose veth cannot be made gives its address back."""
    mgr, _ = make(tmp_path)
    batches = []
    many = mgr.ipam.allocate_many
    monkeypatch.setattr(mgr.ipam, "allocate_many",
                        lambda owners: (batches.append(list(owners)), many(owners))[1])
    wire = links.wire

    def wire_or_fail(ifname, netns, *args, **kwargs):
        if netns == "pod-bad":
            raise OSError("no veth for you")
        return wire(ifname, netns, *args, **kwargs)

    monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", wire_or_fail)

    async def go():
        return await asyncio.gather(*(mgr.create(f"p{i}", "default", {}, f"pod-{i}",
                                                 container_id=f"b{i}") for i in range(6)),
                                    mgr.create("bad", "default", {}, "pod-bad",
                                               container_id="bbad"),
                                    return_exceptions=True)

    made = run(go())
    assert isinstance(made[-1], OSError) and all(not isinstance(e, BaseException)
                                                  for e in made[:-1])
    assert sum(len(b) for b in batches) == 7 and len(batches) < 7
    assert mgr.ipam.allocated() == {e.ipv4: f"container:b{i}" for i, e in enumerate(made[:-1])}
