"""Host-scope IPAM like Cilium's cluster-pool mode on one node (and CNI's host-local): pod
addresses come from the node's pod CIDR; the network address, the gateway (the CIDR's first
address, the pods' default router) and the broadcast address are never handed out.

State is one JSON file rewritten atomically (temp file + rename) under an exclusive `flock`,
re-read on every operation, so several threads or processes sharing the file never hand out
one address twice. Allocation continues after the last address handed out (host-local's
habit), so a just-released address is not reused at once while stale conntrack entries or
neighbours still name it."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pylium.errors import UserError


class IPAMError(UserError):
    """The pool is exhausted, or an address is outside it or already taken."""


class PodCIDRAllocator:
    def __init__(self, cidr: str, state_file: Path):
        self.network = ipaddress.IPv4Network(cidr)
        if self.network.prefixlen > 30:
            raise IPAMError(f"pod CIDR {cidr} is too small (need /30 or larger)")
        self.gateway = self.network.network_address + 1
        self.state_file = Path(state_file)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        #: the file's text as this object last read or wrote it, and the state it holds
        self._text: str | None = None
        self._state: dict = {}
        with self._locked() as state:
            if state.get("cidr") not in (None, str(self.network)):
                raise IPAMError(f"IPAM state {self.state_file} belongs to pod CIDR "
                                f"{state['cidr']}, not {self.network}")

    # persistence --------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """The current state under an exclusive lock; written back if the body changed it."""
        lock_path = self.state_file.with_suffix(self.state_file.suffix + ".lock")
        with self._lock, open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                try:
                    text = self.state_file.read_text()
                except FileNotFoundError:
                    text = None
                if text is not None and text == self._text:
                    # the file holds what this object last read or wrote: no parse (which
                    # costs a few objects per address on every pod start)
                    state = self._copy(self._state)
                else:
                    state = json.loads(text) if text is not None else {}
                    state.setdefault("cidr", str(self.network))
                    state.setdefault("allocated", {})
                    state.setdefault("last", str(self.gateway))
                    self._text, self._state = text, self._copy(state)
                yield state
                if state != self._state or text is None:
                    # json's C encoder (an `indent` takes its pure-Python path: ~10x the
                    # CPU, held with the GIL while the netlink thread wires pods)
                    new_text = json.dumps(state, sort_keys=True)
                    tmp = self.state_file.with_suffix(f".tmp{os.getpid()}")
                    tmp.write_text(new_text)
                    os.replace(tmp, self.state_file)
                    self._text, self._state = new_text, self._copy(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _copy(state: dict) -> dict:
        """A copy the caller may change (the values besides `allocated` are strings)."""
        return {**state, "allocated": dict(state["allocated"])}

    # queries ------------------------------------------------------------------------------
    def reserved(self) -> set[ipaddress.IPv4Address]:
        return {self.network.network_address, self.gateway, self.network.broadcast_address}

    @property
    def capacity(self) -> int:
        return self.network.num_addresses - 3

    def allocated(self) -> dict[str, str]:
        """{address: owner} of every address handed out."""
        with self._locked() as state:
            return dict(state["allocated"])

    # changes ------------------------------------------------------------------------------
    def allocate(self, owner: str) -> str:
        """A free address for `owner`; the same one again if `owner` already holds one."""
        result = self.allocate_many([owner])[0]
        if isinstance(result, IPAMError):
            raise result
        return result

    def allocate_many(self, owners: list[str]) -> list[str | IPAMError]:
        """`allocate` for several owners with one read and one write of the state file
        (the pods of a node starting together): each owner's address, or the error that
        owner got (the others still get theirs)."""
        with self._locked() as state:
            return [self._take(state, owner) for owner in owners]

    def _take(self, state: dict, owner: str) -> str | IPAMError:
        if not owner:
            return IPAMError("an IP allocation needs an owner")
        taken: dict[str, str] = state["allocated"]
        for address, holder in taken.items():
            if holder == owner:
                return address
        if len(taken) >= self.capacity:
            return IPAMError(f"pod CIDR {self.network} is exhausted "
                             f"({self.capacity} addresses in use)")
        first = int(self.network.network_address)
        size = self.network.num_addresses
        start = int(ipaddress.IPv4Address(state["last"])) - first
        reserved = self.reserved()
        for step in range(1, size + 1):
            candidate = ipaddress.IPv4Address(first + (start + step) % size)
            if candidate in reserved or str(candidate) in taken:
                continue
            taken[str(candidate)] = owner
            state["last"] = str(candidate)
            return str(candidate)
        return IPAMError(f"pod CIDR {self.network} is exhausted")  # pragma: no cover

    def allocate_specific(self, address: str, owner: str) -> str:
        """Claim `address` for `owner` (restore after a restart); fine if `owner` has it."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            raise IPAMError(f"ip: {address!r} is not an IPv4 address") from None
        if ip not in self.network or ip in self.reserved():
            raise IPAMError(f"ip: {address} is not an allocatable address of {self.network}")
        with self._locked() as state:
            holder = state["allocated"].get(str(ip))
            if holder not in (None, owner):
                raise IPAMError(f"ip: {address} is already allocated to {holder}")
            state["allocated"][str(ip)] = owner
        return str(ip)

    def release(self, address: str) -> bool:
        """Give `address` back; False if it was not allocated (idempotent)."""
        with self._locked() as state:
            return state["allocated"].pop(address, None) is not None

    def release_owner(self, owner: str) -> list[str]:
        """Release every address `owner` holds; returns them."""
        with self._locked() as state:
            gone = [a for a, o in state["allocated"].items() if o == owner]
            for address in gone:
                del state["allocated"][address]
            return gone
