"""A BPF map seen from Python: typed key/value ctypes structures over an fd."""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from typing import Generic, TypeVar

from pylium.datapath import libbpf
from pylium.datapath.libbpf import DatapathError, lib

K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


class BpfMap(Generic[K, V]):
    """Typed access to one map fd. Per-CPU maps return a list of values, one per CPU."""

    def __init__(self, fd: int, name: str, key_type: type[K], value_type: type[V],
                 percpu: bool = False, owned: bool = True):
        self.fd = fd
        self.name = name
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        self.owned = owned
        self._ncpu = libbpf.possible_cpus() if percpu else 1

    def _value_buffer(self):
        if self.percpu:
            # per-CPU values are each rounded up to 8 bytes
            size = (ctypes.sizeof(self.value_type) + 7) // 8 * 8
            return ctypes.create_string_buffer(size * self._ncpu), size
        return self.value_type(), 0

    def lookup(self, key: K):
        buf, size = self._value_buffer()
        rc = lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(buf))
        if rc < 0:
            if libbpf.errno_of(rc) == errno.ENOENT:
                return None
            libbpf.check(rc, f"lookup in map {self.name}")
        if self.percpu:
            return [self.value_type.from_buffer_copy(buf.raw[i * size:i * size + ctypes.sizeof(self.value_type)])
                    for i in range(self._ncpu)]
        return buf

    def update(self, key: K, value: V, flags: int = libbpf.BPF_ANY) -> None:
        libbpf.check(lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
                     f"update of map {self.name}")

    def delete(self, key: K) -> bool:
        rc = lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if rc < 0:
            if libbpf.errno_of(rc) == errno.ENOENT:
                return False
            libbpf.check(rc, f"delete from map {self.name}")
        return True

    def keys(self) -> Iterator[K]:
        prev = None
        while True:
            nxt = self.key_type()
            rc = lib.bpf_map_get_next_key(self.fd, None if prev is None else ctypes.byref(prev),
                                          ctypes.byref(nxt))
            if rc < 0:
                if libbpf.errno_of(rc) == errno.ENOENT:
                    return
                libbpf.check(rc, f"iterating map {self.name}")
            yield nxt
            prev = nxt

    def items(self) -> Iterator[tuple[K, V]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def items_batched(self, chunk: int = 4096) -> list[tuple[K, V]]:
        """Every entry of a (non-per-CPU) hash map in a few syscalls (BPF_MAP_LOOKUP_BATCH),
        not two per entry: what a walk of a 65,536-entry conntrack table needs. Falls back
        to `items()` where the kernel has no batch operation for the map type."""
        if self.percpu:
            return list(self.items())
        keys = (self.key_type * chunk)()
        values = (self.value_type * chunk)()
        token_in = ctypes.create_string_buffer(max(8, ctypes.sizeof(self.key_type)))
        token_out = ctypes.create_string_buffer(len(token_in))
        found: list[tuple[K, V]] = []
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            rc = lib.bpf_map_lookup_batch(self.fd, None if first else token_in, token_out,
                                          keys, values, ctypes.byref(count), None)
            err = libbpf.errno_of(rc) if rc < 0 else 0
            if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524) and first:
                return list(self.items())  # 524: ENOTSUPP, the kernel's own
            if rc < 0 and err != errno.ENOENT:
                libbpf.check(rc, f"batch lookup in map {self.name}")
            for i in range(count.value):
                found.append((self.key_type.from_buffer_copy(keys[i]),
                              self.value_type.from_buffer_copy(values[i])))
            if err == errno.ENOENT:
                return found
            ctypes.memmove(token_in, token_out, len(token_in))
            first = False

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            libbpf.close(self.fd)
        self.fd = -1


def struct_bytes(value: ctypes.Structure) -> bytes:
    return bytes(value)


def require(cond: bool, message: str) -> None:
    if not cond:
        raise DatapathError(message)
