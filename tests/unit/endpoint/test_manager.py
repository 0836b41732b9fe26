"""EndpointManager semantics with the netlink plumbing replaced by a fake (no root needed):
ids, persistence/restore, rollback, and regeneration that never leaves an endpoint with an
empty or partial policy."""

from __future__ import annotations

import asyncio
import errno
import threading
from types import SimpleNamespace

import pytest
from pylium.datapath import netns as plumbing
from pylium.endpoint import manager as manager_mod
from pylium.endpoint.component import PolicyAdapter, _follow_policy_changes
from pylium.endpoint.manager import EndpointManager, EndpointNotFound
from pylium.endpoint.model import host_ifname
from pylium.errors import UserError
from pylium.identity.cache import IdentityCache
from pylium.identity.labels import LabelSet
from pylium.identity.model import Identity
from pylium.ipam import PodCIDRAllocator
from pylium.policy.engine import PolicyEngine
from pylium.policy.load import load_text
from pylium.policy.mapstate import Direction, EndpointPolicy, PolicyEntry, PolicyKey
from pylium.policy.repository import PolicyRepository
from pyroute2 import NetlinkError


class FakeLinks:
    """Stands in for the veths: remembers which host-side links exist."""

    def __init__(self):
        self.links: dict[str, plumbing.LinkInfo] = {}
        self.next_index = 10

    def wire(self, ifname, netns, ip, gateway, pod_ifname="eth0", mtu=1500):
        if ifname in self.links:  # as the kernel answers a veth of a taken name
            raise NetlinkError(errno.EEXIST, "File exists")
        self.next_index += 1
        host = plumbing.LinkInfo(ifname, self.next_index, f"02:00:00:00:00:{self.next_index:02x}", True)
        self.links[ifname] = host
        if callable(ip):  # as wire_endpoint does once the veth is made: wait for it (and
            try:  # remove the veth if that fails)
                ip = ip()
            except BaseException:
                del self.links[ifname]
                raise
        return plumbing.EndpointLinks(host=host, pod=plumbing.LinkInfo(pod_ifname, 2, "02:aa:00:00:00:01", True))

    def unwire(self, ifname, ip=None):
        return self.links.pop(ifname, None) is not None

    def info(self, ifname, netns=None):
        return self.links.get(ifname)


@pytest.fixture
def links(monkeypatch):
    fake = FakeLinks()
    monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", fake.wire)
    monkeypatch.setattr(manager_mod.plumbing, "unwire_endpoint", fake.unwire)
    monkeypatch.setattr(manager_mod.plumbing, "link_info", fake.info)
    monkeypatch.setattr(manager_mod.plumbing, "netns_exists", lambda ns: not ns.endswith("gone"))
    monkeypatch.setattr(manager_mod.plumbing, "netns_problem",
                        lambda ns: "does not exist" if ns.endswith("gone") else None)
    return fake


class Identities:
    def __init__(self):
        self.ids: dict[tuple, int] = {}
        self.released: list[int] = []

    async def allocate(self, labels):
        return self.ids.setdefault(tuple(sorted(labels.items())), 256 + len(self.ids))

    async def release(self, identity):
        self.released.append(identity)


class Policy:
    def __init__(self):
        self.fail: Exception | None = None
        self.revision = 1

    async def compute(self, ep):
        if self.fail is not None:
            raise self.fail
        key = PolicyKey(identity=0, direction=Direction.INGRESS)
        return EndpointPolicy(True, False, {key: PolicyEntry()}, revision=self.revision)


class Datapath:
    def __init__(self):
        self.attached: dict[int, object] = {}
        self.policies: dict[int, EndpointPolicy] = {}
        self.fail_attach = False
        self.fail_update = False

    async def attach(self, ep):
        if self.fail_attach:
            raise RuntimeError("attach exploded")
        self.attached[ep.id] = ep

    async def detach(self, ep):
        self.attached.pop(ep.id, None)
        self.policies.pop(ep.id, None)

    async def update_policy(self, ep, policy):
        if self.fail_update:
            raise RuntimeError("map update failed")
        self.policies[ep.id] = policy


def make(tmp_path, **kw):
    parts = {"identities": Identities(), "policy": Policy(), "datapath": Datapath()}
    parts.update(kw)
    ipam = PodCIDRAllocator("10.77.0.0/24", tmp_path / "ipam.json")
    return EndpointManager(tmp_path, ipam, **parts), parts


def run(coro):
    return asyncio.run(coro)


def test_create_assigns_small_ids_ips_identities_and_fires_hooks(tmp_path, links):
    created = []
    mgr, parts = make(tmp_path, on_created=created.append)

    async def go():
        a = await mgr.create("a", "default", {"app": "x"}, "pod-a")
        b = await mgr.create("b", "default", {"app": "x"}, "pod-b")
        c = await mgr.create("c", "prod", {"app": "x"}, "pod-c")
        return a, b, c

    a, b, c = run(go())
    assert [e.id for e in (a, b, c)] == [1, 2, 3]
    assert len({a.ipv4, b.ipv4, c.ipv4}) == 3 and "10.77.0.1" not in (a.ipv4, b.ipv4, c.ipv4)
    assert a.identity == b.identity != c.identity  # the namespace label is part of identity
    assert c.identity_labels == {"k8s:app": "x", "k8s:io.kubernetes.pod.namespace": "prod"}
    assert a.ifname == host_ifname("default", "a") and len(a.ifname) <= 15
    assert [e.name for e in created] == ["a", "b", "c"]
    assert all(mgr.get(i).state == "ready" and mgr.get(i).ingress_enforced for i in (1, 2, 3))
    assert set(parts["datapath"].policies) == {1, 2, 3}


def test_ids_are_reused_lowest_first_after_delete(tmp_path, links):
    mgr, _ = make(tmp_path)

    async def go():
        for n in "abc":
            await mgr.create(n, "default", {}, f"pod-{n}")
        await mgr.delete("b")
        return await mgr.create("d", "default", {}, "pod-d")

    assert run(go()).id == 2


def test_delete_releases_everything_and_is_not_found_after(tmp_path, links):
    deleted = []
    mgr, parts = make(tmp_path, on_deleted=deleted.append)

    async def go():
        ep = await mgr.create("a", "default", {"app": "x"}, "pod-a")
        await mgr.delete(str(ep.id))
        return ep

    ep = run(go())
    assert links.links == {} and mgr.ipam.allocated() == {}
    assert parts["datapath"].attached == {} and parts["identities"].released == [ep.identity]
    assert not (tmp_path / "endpoints" / "1.json").exists()
    assert [e.name for e in deleted] == ["a"]
    with pytest.raises(EndpointNotFound):
        mgr.get("a")


def test_failed_create_is_rolled_back(tmp_path, links):
    datapath = Datapath()
    datapath.fail_attach = True
    mgr, parts = make(tmp_path, datapath=datapath)
    with pytest.raises(RuntimeError, match="attach exploded"):
        run(mgr.create("a", "default", {"app": "x"}, "pod-a"))
    assert links.links == {} and mgr.ipam.allocated() == {} and mgr.list() == []
    assert list((tmp_path / "endpoints").glob("*.json")) == []
    assert parts["identities"].released == [256]


class PreparingDatapath(Datapath):
    """A datapath that takes `prepare_policy`: a slot per endpoint id, filled by the first
    policy."""

    def __init__(self):
        super().__init__()
        self.slots: dict[int, str] = {}
        self.fail_prepare = False

    async def prepare_policy(self, ep_id):
        if self.fail_prepare:
            raise RuntimeError("prepare exploded")
        if ep_id in self.slots:
            return False
        self.slots[ep_id] = "prepared"
        return True

    async def release_policy(self, ep_id):
        return self.slots.pop(ep_id, None) is not None

    async def update_policy(self, ep, policy):
        assert self.slots.get(ep.id) in ("prepared", "filled"), "policy before its slot"
        await super().update_policy(ep, policy)
        self.slots[ep.id] = "filled"

    async def detach(self, ep):
        await super().detach(ep)
        self.slots.pop(ep.id, None)


class SplitDatapath(PreparingDatapath):
    """Detaches in two halves; records the order of the steps around the veth's removal."""

    def __init__(self, links, ipam_of):
        super().__init__()
        self.steps: list[str] = []
        self.links, self.ipam_of = links, ipam_of

    async def detach(self, ep):
        raise AssertionError("a manager that can split the detach must not call it whole")

    async def unpublish(self, ep):
        assert ep.ifname in self.links.links, "the programs go before the veth"
        self.steps.append("unpublish")
        self.attached.pop(ep.id, None)

    async def forget(self, ep):
        self.steps.append("forget")
        await asyncio.sleep(0.05)  # an RCU grace period
        assert ep.ipv4 in self.ipam_of().allocated(), "the address outlives the datapath state"
        self.policies.pop(ep.id, None)
        self.slots.pop(ep.id, None)
        self.steps.append("forgotten")


def test_a_delete_forgets_the_datapath_state_while_the_veth_goes(tmp_path, links):
    holder = {}
    datapath = SplitDatapath(links, lambda: holder["mgr"].ipam)
    mgr, parts = make(tmp_path, datapath=datapath)
    holder["mgr"] = mgr

    async def go():
        ep = await mgr.create("a", "default", {"app": "x"}, "pod-a", container_id="c" * 12)
        assert await mgr.delete_container("c" * 12) is not None
        return ep

    ep = run(go())
    assert datapath.steps == ["unpublish", "forget", "forgotten"]
    assert datapath.slots == {} and datapath.attached == {} and datapath.policies == {}
    assert links.links == {} and mgr.ipam.allocated() == {} and mgr.list() == []
    assert parts["identities"].released == [ep.identity]
    assert list((tmp_path / "endpoints").glob("*.json")) == []


def test_a_create_prepares_the_policy_slot_and_files_the_endpoint_before_answering(
        tmp_path, links):
    datapath = PreparingDatapath()
    mgr, _ = make(tmp_path, datapath=datapath)

    async def go():
        eps = await asyncio.gather(*(mgr.create(n, "default", {"app": "x"}, f"pod-{n}")
                                     for n in "abc"))
        # each answer comes once its state file holds the ready endpoint (restorable)
        for ep in eps:
            on_disk = (tmp_path / "endpoints" / f"{ep.id}.json").read_text()
            assert '"state": "ready"' in on_disk
        await mgr.delete("b")
        return eps

    eps = run(go())
    assert datapath.slots == {1: "filled", 3: "filled"}
    assert sorted(datapath.policies) == [1, 3] and [e.id for e in eps] == [1, 2, 3]


def test_the_veth_is_made_while_the_address_is_allocated(tmp_path, links, monkeypatch):
    """The netlink thread starts on the veth before the IPAM thread hands out the address
    (it waits for it only to configure the pod's end)."""
    mgr, _parts = make(tmp_path)
    wiring = threading.Event()
    allocate_many = mgr.ipam.allocate_many

    def after_the_wire_began(owners):
        assert wiring.wait(10), "the veth waited for the address"
        return allocate_many(owners)

    def wire(ifname, netns, ip, *args, **kwargs):
        wiring.set()
        return links.wire(ifname, netns, ip, *args, **kwargs)

    monkeypatch.setattr(mgr.ipam, "allocate_many", after_the_wire_began)
    monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", wire)
    ep = run(mgr.create("a", "default", {"app": "x"}, "pod-a"))
    assert mgr.ipam.allocated() == {ep.ipv4: "endpoint:default/a"}


def test_a_create_cancelled_while_its_address_is_allocated_leaves_nothing(tmp_path, links,
                                                                          monkeypatch):
    """The agent stopping (its creates cancelled) while a veth waits for its address: the
    veth goes and the address, once allocated, is given back."""
    mgr, _parts = make(tmp_path)
    wiring, go_on, allocated = threading.Event(), threading.Event(), threading.Event()
    allocate_many = mgr.ipam.allocate_many

    def held(owners):
        assert go_on.wait(10)
        try:
            return allocate_many(owners)
        finally:
            allocated.set()

    def wire(*args, **kwargs):
        wiring.set()
        return links.wire(*args, **kwargs)

    monkeypatch.setattr(mgr.ipam, "allocate_many", held)
    monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", wire)

    async def go():
        create = asyncio.create_task(mgr.create("a", "default", {"app": "x"}, "pod-a"))
        while not wiring.is_set():
            await asyncio.sleep(0.001)
        create.cancel()
        with pytest.raises(asyncio.CancelledError):
            await create
        go_on.set()
        for _ in range(2000):  # the netlink thread removes the veth, the address goes back
            if allocated.is_set() and not links.links and not mgr.ipam.allocated():
                break
            await asyncio.sleep(0.005)

    run(go())
    assert links.links == {} and mgr.ipam.allocated() == {}


def test_an_exhausted_pool_fails_the_create_and_leaves_nothing(tmp_path, links):
    parts = {"identities": Identities(), "policy": Policy(), "datapath": PreparingDatapath()}
    mgr = EndpointManager(tmp_path, PodCIDRAllocator("10.77.0.0/30", tmp_path / "ipam.json"),
                          **parts)  # one address
    first = run(mgr.create("a", "default", {"app": "x"}, "pod-a"))
    with pytest.raises(UserError, match="exhausted"):
        run(mgr.create("b", "default", {"app": "x"}, "pod-b"))
    assert list(links.links) == [first.ifname] and [e.id for e in mgr.list()] == [first.id]
    assert mgr.ipam.allocated() == {first.ipv4: "endpoint:default/a"}
    assert parts["datapath"].slots == {first.id: "filled"}
    assert parts["identities"].released == [first.identity]  # b's reference, given back


@pytest.mark.parametrize("failing", ["attach", "prepare", "wire"])
def test_a_failed_create_gives_back_its_prepared_slot(tmp_path, links, failing, monkeypatch):
    datapath = PreparingDatapath()
    datapath.fail_attach = failing == "attach"
    datapath.fail_prepare = failing == "prepare"
    if failing == "wire":
        def broken(*_args, **_kw):
            raise RuntimeError("wire exploded")
        monkeypatch.setattr(manager_mod.plumbing, "wire_endpoint", broken)
    mgr, parts = make(tmp_path, datapath=datapath)
    with pytest.raises(RuntimeError, match=f"{failing} exploded"):
        run(mgr.create("a", "default", {"app": "x"}, "pod-a"))
    assert datapath.slots == {} and datapath.attached == {}
    assert links.links == {} and mgr.ipam.allocated() == {} and mgr.list() == []
    assert list((tmp_path / "endpoints").glob("*.json")) == []
    assert parts["identities"].released == [256]


def test_bad_input_is_refused_before_anything_is_made(tmp_path, links):
    mgr, _ = make(tmp_path)
    for args, field in [(("A_b", "default", {}, "pod"), "name"),
                        (("a", "default", {"x": "a b"}, "pod"), "labels.x"),
                        (("a", "default", {"k8s:x": "1"}, "pod"), "labels"),
                        (("a", "default", {}, "pod-gone"), "netns"),
                        (("a", "default", {}, ""), "netns")]:
        with pytest.raises(UserError) as err:
            run(mgr.create(*args))
        assert str(err.value).startswith(field)
    assert links.links == {} and mgr.ipam.allocated() == {}


def test_failed_regeneration_keeps_the_old_policy_and_is_loud(tmp_path, links, caplog):
    mgr, parts = make(tmp_path)
    ep = run(mgr.create("a", "default", {"app": "x"}, "pod-a"))
    installed = parts["datapath"].policies[ep.id]
    parts["policy"].fail = RuntimeError("selector exploded")
    parts["policy"].revision = 2
    result = run(mgr.regenerate_all("policy import"))
    assert result["failed"] and "selector exploded" in result["failed"][ep.id]
    assert parts["datapath"].policies[ep.id] is installed  # never replaced, never emptied
    now = mgr.get(ep.id)
    assert now.state == "not-ready" and "previous policy kept" in now.error
    assert any("selector exploded" in r.message for r in caplog.records if r.levelname == "ERROR")
    # the datapath refusing the new map is handled the same way
    parts["policy"].fail = None
    parts["datapath"].fail_update = True
    run(mgr.regenerate_all("retry"))
    assert parts["datapath"].policies[ep.id] is installed and mgr.get(ep.id).state == "not-ready"
    # and once it works again the endpoint recovers
    parts["datapath"].fail_update = False
    run(mgr.regenerate_all("retry"))
    assert mgr.get(ep.id).state == "ready" and mgr.get(ep.id).policy_revision == 2
    assert mgr.regeneration_status()["not_ready"] == []


def test_restore_adopts_live_endpoints_and_drops_gone_ones(tmp_path, links):
    mgr, _ = make(tmp_path)

    async def go():
        a = await mgr.create("a", "default", {"app": "x"}, "pod-a")
        b = await mgr.create("b", "default", {"app": "y"}, "pod-b")
        return a, b

    a, b = run(go())
    links.links.pop(b.ifname)  # pod b went away while the agent was down
    again, parts = make(tmp_path)  # a new agent process on the same state dir
    result = run(again.restore())
    assert result == {"adopted": [a.id], "dropped": [b.id]}
    assert again.get(a.id).ipv4 == a.ipv4 and again.get(a.id).ifindex == a.ifindex
    assert again.ipam.allocated() == {a.ipv4: "endpoint:default/a"}
    assert list(parts["datapath"].attached) == [a.id]  # maps re-published, not re-wired
    assert len(links.links) == 1
    # the next endpoint does not reuse a's id or address
    c = run(again.create("c", "default", {}, "pod-c"))
    assert c.id != a.id and c.ipv4 != a.ipv4


def test_ids_of_unreadable_state_files_are_never_reused(tmp_path, links):
    (tmp_path / "endpoints").mkdir()
    (tmp_path / "endpoints" / "2.json").write_text("{not json")
    mgr, _ = make(tmp_path)
    assert run(mgr.restore()) == {"adopted": [], "dropped": []}

    async def go():
        return [await mgr.create(n, "default", {}, f"pod-{n}") for n in "abc"]

    a, b, c = run(go())
    assert [a.id, b.id, c.id] == [1, 3, 4]
    run(mgr.delete(a.id))
    assert run(mgr.create("d", "default", {}, "pod-d")).id == 1  # a's id is free again
    assert (tmp_path / "endpoints" / "2.json").read_text() == "{not json"


def test_without_datapath_endpoints_are_wired_but_carry_no_policy(tmp_path, links):
    mgr, _ = make(tmp_path, datapath=None, policy=None)
    ep = run(mgr.create("a", "default", {}, "pod-a"))
    assert ep.state == "ready" and not ep.ingress_enforced
    assert mgr.missing == ["policy", "datapath"]


def test_a_stale_veth_from_an_unfinished_create_is_replaced(tmp_path, links):
    mgr, _ = make(tmp_path)
    stale = host_ifname("default", "a")
    links.links[stale] = plumbing.LinkInfo(stale, 99, "02:00:00:00:00:99", True)
    ep = run(mgr.create("a", "default", {}, "pod-a"))
    assert ep.ifindex != 99 and links.links[stale].ifindex == ep.ifindex


# incremental regeneration: the real policy engine and the agent's glue -------------------

class CacheIdentities:
    """An identity port over a real `IdentityCache` (what the identity manager does, minus
    the KV store): a new label set becomes a new identity and the cache announces it."""

    def __init__(self, cache):
        self.cache = cache
        self.next = 300

    async def allocate(self, labels):
        label_set = LabelSet.parse([f"{k}={v}" for k, v in labels.items()])
        known = self.cache.by_labels(label_set)
        if known is not None:
            return known.id
        self.next += 1
        self.cache.add(Identity(self.next, label_set))
        return self.next

    async def release(self, identity):
        pass


class CountingDatapath(Datapath):
    def __init__(self):
        super().__init__()
        self.updates: list[int] = []

    async def update_policy(self, ep, policy):
        self.updates.append(ep.id)
        await super().update_policy(ep, policy)


WEB_FROM_CLIENT = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-client}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def engine_manager(tmp_path):
    """An EndpointManager wired as the agent wires it: the real engine behind the agent's
    PolicyAdapter, and `_follow_policy_changes` queueing the identities the engine names."""
    cache = IdentityCache()
    repo = PolicyRepository()
    repo.add(load_text(WEB_FROM_CLIENT))
    engine = PolicyEngine(repo, cache)
    datapath = CountingDatapath()
    ipam = PodCIDRAllocator("10.77.0.0/24", tmp_path / "ipam.json")
    mgr = EndpointManager(tmp_path, ipam, identities=CacheIdentities(cache),
                          policy=PolicyAdapter(SimpleNamespace(engine=engine), set),
                          datapath=datapath)
    daemon = SimpleNamespace(spawn=lambda coro: asyncio.get_running_loop().create_task(coro))
    _follow_policy_changes(daemon, mgr, engine)
    return mgr, datapath, engine


async def settle(mgr):
    """Let queued regeneration tasks finish (what /v1/endpoint-regeneration reports)."""
    while mgr.regeneration_status()["busy"]:
        await asyncio.sleep(0)


def test_an_endpoint_of_a_known_identity_regenerates_no_other_endpoint(tmp_path, links):
    mgr, datapath, _ = engine_manager(tmp_path)

    async def go():
        for name, app in [("w1", "web"), ("w2", "web"), ("c1", "client"), ("d1", "db")]:
            await mgr.create(name, "default", {"app": app}, f"pod-{name}")
        await settle(mgr)
        datapath.updates.clear()
        w3 = await mgr.create("w3", "default", {"app": "web"}, "pod-w3")
        c2 = await mgr.create("c2", "default", {"app": "client"}, "pod-c2")
        await settle(mgr)
        created = list(datapath.updates)
        datapath.updates.clear()
        await mgr.delete("c2")
        await settle(mgr)
        return w3, c2, created

    w3, c2, created = run(go())
    assert created == [w3.id, c2.id]  # each create loaded its own policy and nothing else
    assert datapath.updates == []  # deleting one of two client pods changes no policy
    assert mgr.last_regeneration["endpoints"] == 0


def test_a_new_identity_regenerates_exactly_the_endpoints_that_select_it(tmp_path, links):
    mgr, datapath, engine = engine_manager(tmp_path)

    async def go():
        for name, app in [("w1", "web"), ("w2", "web"), ("d1", "db")]:
            await mgr.create(name, "default", {"app": app}, f"pod-{name}")
        await settle(mgr)
        datapath.updates.clear()
        c1 = await mgr.create("c1", "default", {"app": "client"}, "pod-c1")
        regenerated_by_create = list(datapath.updates)  # before any background pass
        await settle(mgr)
        return c1, regenerated_by_create

    c1, by_create = run(go())
    w1, w2, d1 = (mgr.get(n) for n in ("w1", "w2", "d1"))
    # the web pods' policy selects the new client identity; the db pod's does not
    assert sorted(by_create) == sorted([w1.id, w2.id, c1.id])
    assert sorted(datapath.updates) == sorted([w1.id, w2.id, c1.id])
    # and the web pods' installed policy now admits the client's identity on port 80
    for web in (w1, w2):
        installed = datapath.policies[web.id]
        assert installed.ingress_enforced
        assert any(k.identity == c1.identity and k.port == 80
                   for k in installed.entries), installed.entries
    assert d1.id not in datapath.updates


def test_a_netns_named_two_ways_is_one_netns_and_a_create_compares_files_once(
        tmp_path, links, monkeypatch):
    """`pod-a` and `/run/netns/pod-a` name one netns (compared by the file that names it
    when there is no inode to compare); and a create works out each endpoint's file once,
    not once per later create (a node with many pods paid it on every pod start)."""
    mgr, _ = make(tmp_path)
    made = []
    real = plumbing.netns_path

    def counting(netns):
        made.append(netns)
        return real(netns)

    monkeypatch.setattr(manager_mod.plumbing, "netns_path", counting)

    async def go():
        for i in range(8):
            await mgr.create(f"p{i}", "default", {"app": "x"}, f"pod-{i}")
        with pytest.raises(UserError, match="already belongs"):
            await mgr.create("other", "default", {"app": "x"}, "/run/netns/pod-3")
        made.clear()
        await mgr.create("p8", "default", {"app": "x"}, "pod-8")
        await mgr.create("p9", "default", {"app": "x"}, "pod-9")

    run(go())
    # the new pods' own files (each create: its stat, its file, and the file of the pod
    # before it, worked out for the comparison), not two per endpoint already there (~40)
    assert len(made) <= 8, made
