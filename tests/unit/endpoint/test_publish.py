"""A new endpoint's datapath start in one thread job (`DatapathAdapter.publish`): published,
its first policy filled and its state file written before the create answers; the create's
regeneration pass then has nothing left to load or write. Runs the real adapter over a
synchronous fake of `pylium.datapath.Datapath` (no root needed)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from pylium.endpoint import manager as manager_mod
from pylium.endpoint.component import DatapathAdapter
from pylium.endpoint.model import NOT_READY, READY

from tests.unit.endpoint.test_manager import Policy, make
from tests.unit.endpoint.test_manager import links as fake_links  # noqa: F401 (fixture)


@pytest.fixture
def links(fake_links, monkeypatch):  # noqa: F811
    """The fake veths, with the datapath's programs hook called as `wire_endpoint` does."""
    wire = fake_links.wire

    def wire_with_hook(ifname, netns, ip, gateway, on_host_link=None, **options):
        made = wire(ifname, netns, ip, gateway, **options)
        if on_host_link is not None:
            on_host_link(made.host)
        return made

    monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", wire_with_hook)
    return fake_links


class SyncDatapath:
    """The calls `DatapathAdapter` makes of `Datapath`, recorded with the thread they ran
    on; `policy_in_place` is asked on the event loop."""

    def __init__(self):
        self.calls: list[tuple[str, int, str]] = []
        self.slots: dict[int, str] = {}
        self.ipcache: dict[str, int] = {}
        self.endpoints: dict[int, object] = {}
        self.fail_fill = 0  # how many fills fail from now on
        self.fail_attach = False
        self.macs_seen: dict[int, str | None] = {}
        self.lock = threading.Lock()

    def _record(self, what: str, ep_id: int) -> None:
        with self.lock:
            self.calls.append((what, ep_id, threading.current_thread().name))

    def attach_programs(self, ifindex, mac):
        self.programs = getattr(self, "programs", 0) + 1

    def prepare_policy(self, ep_id):
        self._record("prepare", ep_id)
        self.slots[ep_id] = "prepared"
        return True

    def policy_in_place(self, ep_id):
        return ep_id in self.slots

    def release_policy(self, ep_id):
        self._record("release", ep_id)
        return self.slots.pop(ep_id, None) is not None

    def attach_endpoint(self, info, mac_seen=None):
        self._record("attach", info.ep_id)
        self.macs_seen[info.ep_id] = mac_seen
        if self.fail_attach:
            raise RuntimeError("endpoints map full")
        self.endpoints[info.ep_id] = info

    def upsert_ipcache(self, cidr, identity, tunnel_endpoint=None):
        self.ipcache[cidr] = identity

    def delete_ipcache(self, cidr):
        self.ipcache.pop(cidr, None)

    def update_policy(self, ep_id, policy):
        self._record("fill", ep_id)
        assert self.slots.get(ep_id) in ("prepared", "filled"), "policy before its slot"
        if self.fail_fill:
            self.fail_fill -= 1
            raise OSError("policy map update failed")
        self.slots[ep_id] = "filled"

    def detach_endpoint(self, ep_id):
        self._record("detach", ep_id)
        self.endpoints.pop(ep_id, None)
        self.slots.pop(ep_id, None)

    def unpublish_endpoint(self, ep_id):
        self._record("unpublish", ep_id)
        self.endpoints.pop(ep_id, None)

    def forget_endpoint(self, ep_id):
        self._record("forget", ep_id)
        self.slots.pop(ep_id, None)


def run(coro):
    return asyncio.run(coro)


def steps(datapath, ep_id):
    return [what for what, eid, _thread in datapath.calls if eid == ep_id]


def test_publish_fill_and_state_file_are_one_job_before_the_answer(tmp_path, links):
    fake = SyncDatapath()
    mgr, _ = make(tmp_path, datapath=DatapathAdapter(fake))
    written_on: list[str] = []
    writer = mgr._state_writer

    def tracking_writer(ep):
        write = writer(ep)

        def wrapped():
            written_on.append(threading.current_thread().name)
            write()
        return wrapped

    mgr._state_writer = tracking_writer

    async def go():
        eps = await asyncio.gather(*(mgr.create(n, "default", {"app": "x"}, f"pod-{n}")
                                     for n in "abc"))
        # restorable before the answer: the file holds the endpoint, ready, policy loaded
        for ep in eps:
            on_disk = json.loads((tmp_path / "endpoints" / f"{ep.id}.json").read_text())
            assert on_disk["ipv4"] == ep.ipv4 and on_disk["state"] == READY
            assert on_disk["policy_revision"] == 1
        return eps

    eps = run(go())
    for ep in eps:
        assert ep.state == READY and ep.ingress_enforced and ep.policy_revision == 1
        # published, filled once (the create's regeneration found it loaded), in one job
        assert steps(fake, ep.id) == ["prepare", "attach", "fill"]
        threads = {t for what, eid, t in fake.calls if eid == ep.id and what != "prepare"}
        assert len(threads) == 1 and threads != {threading.main_thread().name}
        assert fake.slots[ep.id] == "filled" and f"{ep.ipv4}/32" in fake.ipcache
        # the veth's MAC as the netlink answer gave it: the datapath does not ask again
        assert fake.macs_seen[ep.id] == ep.mac
    # one state file write per create, on the datapath threads (none on the event loop)
    assert len(written_on) == 3
    assert threading.main_thread().name not in written_on


def test_a_fill_that_fails_is_regenerated_and_the_endpoint_still_starts(tmp_path, links):
    fake = SyncDatapath()
    fake.fail_fill = 1
    mgr, _ = make(tmp_path, datapath=DatapathAdapter(fake))

    async def go():
        return await mgr.create("a", "default", {"app": "x"}, "pod-a")

    ep = run(go())
    # the publish's fill failed; the create's regeneration pass loaded it
    assert steps(fake, ep.id) == ["prepare", "attach", "fill", "fill"]
    assert ep.state == READY and fake.slots[ep.id] == "filled"
    on_disk = json.loads((tmp_path / "endpoints" / f"{ep.id}.json").read_text())
    assert on_disk["state"] == READY


def test_a_fill_that_keeps_failing_leaves_the_endpoint_not_ready(tmp_path, links):
    fake = SyncDatapath()
    fake.fail_fill = 2
    mgr, _ = make(tmp_path, datapath=DatapathAdapter(fake))

    async def go():
        return await mgr.create("a", "default", {"app": "x"}, "pod-a")

    ep = run(go())
    assert ep.state == NOT_READY and "policy map update failed" in ep.error
    on_disk = json.loads((tmp_path / "endpoints" / f"{ep.id}.json").read_text())
    assert on_disk["state"] == NOT_READY


def test_a_policy_that_cannot_be_computed_publishes_with_the_slot_empty(tmp_path, links):
    fake = SyncDatapath()
    policy = Policy()
    policy.fail = RuntimeError("engine broken")
    mgr, _ = make(tmp_path, datapath=DatapathAdapter(fake), policy=policy)

    async def go():
        return await mgr.create("a", "default", {"app": "x"}, "pod-a")

    ep = run(go())
    assert steps(fake, ep.id) == ["prepare", "attach"]
    assert fake.slots[ep.id] == "prepared"  # never an allow-all: the empty prepared map
    assert ep.state == NOT_READY and "engine broken" in ep.error


def test_a_publish_that_fails_undoes_the_create(tmp_path, links):
    fake = SyncDatapath()
    fake.fail_attach = True
    mgr, _ = make(tmp_path, datapath=DatapathAdapter(fake))

    async def go():
        with pytest.raises(RuntimeError, match="endpoints map full"):
            await mgr.create("a", "default", {"app": "x"}, "pod-a")

    run(go())
    assert mgr.list() == [] and links.links == {}
    assert mgr.ipam.allocated() == {}
    assert not list((tmp_path / "endpoints").glob("*.json"))
    assert fake.slots == {} and fake.endpoints == {}


def test_restore_adopts_what_the_publish_job_wrote(tmp_path, links):
    fake = SyncDatapath()
    mgr, _ = make(tmp_path, datapath=DatapathAdapter(fake))

    async def first():
        ep = await mgr.create("a", "default", {"app": "x"}, "pod-a")
        await mgr.close()
        return ep

    ep = run(first())
    again, _ = make(tmp_path, datapath=DatapathAdapter(SyncDatapath()))

    async def second():
        return await again.restore()

    assert run(second()) == {"adopted": [ep.id], "dropped": []}
    assert again.get(ep.id).ipv4 == ep.ipv4
