"""Pod CIDR IPAM: no address handed out twice, none leaked, reserved ones never used."""

from __future__ import annotations

import ipaddress
import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest
from pylium.ipam import IPAMError, PodCIDRAllocator


def test_hands_out_distinct_addresses_and_never_reserved_ones(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/28", tmp_path / "ipam.json")
    got = [ipam.allocate(f"ep{i}") for i in range(ipam.capacity)]
    assert len(set(got)) == 13
    assert {"10.9.0.0", "10.9.0.1", "10.9.0.15"}.isdisjoint(got)
    assert all(ipaddress.IPv4Address(a) in ipaddress.IPv4Network("10.9.0.0/28") for a in got)
    assert ipam.gateway == ipaddress.IPv4Address("10.9.0.1")


def test_exhaustion_is_a_clear_error_and_release_makes_room(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/29", tmp_path / "ipam.json")
    got = [ipam.allocate(f"ep{i}") for i in range(5)]
    with pytest.raises(IPAMError, match="exhausted"):
        ipam.allocate("one-too-many")
    assert ipam.release(got[2]) is True
    assert ipam.allocate("late") == got[2]


def test_same_owner_gets_the_same_address(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/24", tmp_path / "ipam.json")
    assert ipam.allocate("a") == ipam.allocate("a")
    assert len(ipam.allocated()) == 1


def test_release_is_idempotent_and_release_owner_frees_everything(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/24", tmp_path / "ipam.json")
    a = ipam.allocate("a")
    assert ipam.release(a) is True
    assert ipam.release(a) is False
    ipam.allocate_specific("10.9.0.77", "b")
    ipam.allocate("b")
    assert ipam.release_owner("b") == ["10.9.0.77"]
    assert ipam.allocated() == {}


def test_released_address_is_not_reused_at_once(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/24", tmp_path / "ipam.json")
    first = ipam.allocate("a")
    ipam.release(first)
    assert ipam.allocate("b") != first


def test_state_persists_across_reopen(tmp_path):
    path = tmp_path / "ipam.json"
    ipam = PodCIDRAllocator("10.9.0.0/24", path)
    a, b = ipam.allocate("a"), ipam.allocate("b")
    reopened = PodCIDRAllocator("10.9.0.0/24", path)
    assert reopened.allocated() == {a: "a", b: "b"}
    assert reopened.allocate("c") not in (a, b)
    with pytest.raises(IPAMError, match="belongs to pod CIDR 10.9.0.0/24"):
        PodCIDRAllocator("10.8.0.0/24", path)


def test_allocate_specific_refuses_taken_reserved_and_foreign(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/24", tmp_path / "ipam.json")
    ipam.allocate_specific("10.9.0.50", "a")
    assert ipam.allocate_specific("10.9.0.50", "a") == "10.9.0.50"
    with pytest.raises(IPAMError, match="already allocated to a"):
        ipam.allocate_specific("10.9.0.50", "b")
    for bad in ("10.9.0.1", "10.9.0.255", "10.8.0.5"):
        with pytest.raises(IPAMError, match="not an allocatable"):
            ipam.allocate_specific(bad, "b")
    with pytest.raises(IPAMError, match="not an IPv4"):
        ipam.allocate_specific("nope", "b")


def test_concurrent_threads_never_share_an_address(tmp_path):
    ipam = PodCIDRAllocator("10.9.0.0/24", tmp_path / "ipam.json")
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: ipam.allocate(f"t{i}"), range(200)))
    assert len(set(got)) == 200
    assert len(ipam.allocated()) == 200


def _allocate_many(args):
    path, prefix = args
    ipam = PodCIDRAllocator("10.9.0.0/24", path)
    return [ipam.allocate(f"{prefix}-{i}") for i in range(40)]


def test_concurrent_processes_never_share_an_address(tmp_path):
    path = tmp_path / "ipam.json"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_allocate_many, [(path, f"p{i}") for i in range(4)])
    flat = [a for r in results for a in r]
    assert len(flat) == len(set(flat)) == 160
    assert len(PodCIDRAllocator("10.9.0.0/24", path).allocated()) == 160


def test_allocate_many_writes_once_and_reports_each_owner(tmp_path, monkeypatch):
    """Several owners in one read and write of the state file: distinct addresses, an
    owner asking again gets its own, the ones the pool cannot serve get their error while
    the others keep theirs, and all of it is on disk."""
    alloc = PodCIDRAllocator("10.9.0.0/29", tmp_path / "ipam.json")  # 5 usable
    held = alloc.allocate("old")
    writes = []
    real = type(tmp_path).write_text
    monkeypatch.setattr(type(tmp_path), "write_text",
                        lambda self, *a, **k: (writes.append(self), real(self, *a, **k))[1])
    got = alloc.allocate_many(["a", "old", "b", "", "c", "d", "e"])
    assert len(writes) == 1
    addresses = [g for g in got if isinstance(g, str)]
    assert got[1] == held and len(set(addresses)) == len(addresses) == 5
    assert isinstance(got[3], IPAMError) and "owner" in str(got[3])
    assert isinstance(got[6], IPAMError) and "exhausted" in str(got[6])
    reopened = PodCIDRAllocator("10.9.0.0/29", tmp_path / "ipam.json")
    owners = ["a", "old", "b", "", "c", "d", "e"]
    assert reopened.allocated() == {a: o for a, o in zip(got, owners, strict=True)
                                    if isinstance(a, str)}
