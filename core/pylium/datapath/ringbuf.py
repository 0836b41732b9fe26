"""Read the datapath's BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`) and its lost-event counter.

libbpf's `ring_buffer__new/poll/consume/free` through ctypes. A ctypes callback per record is
the unavoidable cost of libbpf's API, so the callback does the least it can: it copies the
record into one pre-allocated batch buffer (`memmove`) and returns; the caller then decodes
the whole batch at once (`pylium.flow.decode.Decoder.decode`). When the batch buffer is full the
callback stops the consume loop (libbpf advances the consumer position only past records it
handed over), so nothing is lost on the Python side: the rest stays in the kernel ring.

The per-CPU array `events_lost` (key 0, one u64 per possible CPU) is bumped by the BPF side
whenever `bpf_ringbuf_reserve` fails; `read_lost_counter` sums it."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Self

#: ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

_fallback_lib: ctypes.CDLL | None = None
_fallback_lock = threading.Lock()
_fns: dict[int, _Functions] = {}


def _cdll() -> ctypes.CDLL:
    """The process's libbpf: `pylium.datapath.libbpf.lib` when that module is present, else
    our own `CDLL("libbpf.so.1")` (the same shared object either way, so pointers and fds
    cross freely)."""
    try:
        from pylium.datapath import libbpf as shared

        return shared.lib
    except (ImportError, AttributeError):
        global _fallback_lib
        with _fallback_lock:
            if _fallback_lib is None:
                _fallback_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
            return _fallback_lib


class _Functions:
    """Our own typed function pointers (`lib[name]` makes a fresh one each time), so the
    declarations here never change those another module set on the shared CDLL."""

    def __init__(self, lib: ctypes.CDLL):
        vp, c_int = ctypes.c_void_p, ctypes.c_int

        def fn(name, restype, *argtypes):
            f = lib[name]
            f.restype, f.argtypes = restype, list(argtypes)
            return f

        self.ring_buffer__new = fn("ring_buffer__new", vp, c_int, SAMPLE_FN, vp, vp)
        self.ring_buffer__poll = fn("ring_buffer__poll", c_int, vp, c_int)
        self.ring_buffer__consume = fn("ring_buffer__consume", c_int, vp)
        self.ring_buffer__epoll_fd = fn("ring_buffer__epoll_fd", c_int, vp)
        self.ring_buffer__free = fn("ring_buffer__free", None, vp)
        self.bpf_obj_get = fn("bpf_obj_get", c_int, ctypes.c_char_p)
        self.bpf_map_lookup_elem = fn("bpf_map_lookup_elem", c_int, c_int, vp, vp)
        self.libbpf_num_possible_cpus = fn("libbpf_num_possible_cpus", c_int)


def libbpf() -> _Functions:
    lib = _cdll()
    fns = _fns.get(id(lib))
    if fns is None:
        fns = _fns[id(lib)] = _Functions(lib)
    return fns


class RingBufferError(OSError):
    """A libbpf ring-buffer call failed (carries errno)."""


def _check_fd(fd: int, what: str) -> int:
    if fd < 0:
        err = ctypes.get_errno() or -fd
        raise RingBufferError(err, f"{what}: {os.strerror(err)}")
    return fd


def open_pinned(path: str | os.PathLike) -> int:
    """fd of a pinned BPF object (the caller closes it)."""
    return _check_fd(libbpf().bpf_obj_get(os.fsencode(os.fspath(path))), f"bpf_obj_get {path}")


def num_possible_cpus() -> int:
    n = libbpf().libbpf_num_possible_cpus()
    if n <= 0:
        raise RingBufferError(-n, "libbpf_num_possible_cpus failed")
    return n


def read_lost_counter(map_fd: int) -> int:
    """Sum over CPUs of the per-CPU array `events_lost` at key 0."""
    ncpu = num_possible_cpus()
    values = (ctypes.c_uint64 * ncpu)()
    key = ctypes.c_uint32(0)
    rc = libbpf().bpf_map_lookup_elem(map_fd, ctypes.byref(key), values)
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise RingBufferError(err, f"lookup events_lost: {os.strerror(err)}")
    return sum(values)


class LostCounter:
    """The pinned per-CPU `events_lost` counter, opened once."""

    def __init__(self, fd: int, owned: bool = True):
        self.fd = fd
        self._owned = owned

    @classmethod
    def open_pinned(cls, path: str | os.PathLike) -> LostCounter:
        return cls(open_pinned(path))

    def read(self) -> int:
        return read_lost_counter(self.fd)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class _RingReader:
    """What both readers share: an optional owned map fd, a lock around every call, and one
    `close()` (idempotent, also the context manager's exit) that frees the reader's own
    resources (`_release`) before closing the fd it owns."""

    def __init__(self, map_fd: int, record_size: int, batch_records: int, owned_fd: bool):
        if record_size <= 0 or batch_records <= 0:
            raise ValueError("record_size and batch_records must be positive")
        self.map_fd = map_fd
        self.record_size = record_size
        self.batch_records = batch_records
        self._owned_fd = owned_fd
        #: records seen with an unexpected size (never expected; counted, not silent)
        self.malformed = 0
        #: records handed to the caller so far
        self.delivered = 0
        self._lock = threading.Lock()

    @classmethod
    def open_pinned(cls, path: str | os.PathLike, **kw) -> Self:
        """A reader over a pinned ring buffer; it owns (and closes) the fd it opens."""
        fd = open_pinned(path)
        try:
            return cls(fd, owned_fd=True, **kw)
        except BaseException:
            os.close(fd)
            raise

    def _release(self) -> None:
        """Free what the subclass set up over the fd (called under the lock, at most once
        per resource: it checks what is still held)."""
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            self._release()
            if self._owned_fd and self.map_fd >= 0:
                os.close(self.map_fd)
                self.map_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RingBufferReader(_RingReader):
    """Batch reader over one ring-buffer map fd.

    `poll(timeout_ms)` / `consume()` return a `memoryview` over the records copied since the
    last call, each exactly `record_size` bytes (records of another size are counted in
    `malformed` and skipped). The view is valid until the next poll/consume. Calls release
    the GIL while waiting in the kernel (ctypes CDLL), so a reader thread costs nothing idle.
    """

    def __init__(self, map_fd: int, record_size: int = 64, batch_records: int = 4096,
                 owned_fd: bool = False):
        super().__init__(map_fd, record_size, batch_records, owned_fd)
        self._buf = ctypes.create_string_buffer(record_size * batch_records)
        self._base = ctypes.addressof(self._buf)
        self._cap = record_size * batch_records
        self._off = 0
        self._full = False
        self._cb = SAMPLE_FN(self._on_sample)  # keep a reference for libbpf's lifetime
        lib = libbpf()
        ptr = lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not ptr:
            err = ctypes.get_errno() or errno.EINVAL
            raise RingBufferError(err, f"ring_buffer__new(fd {map_fd}): {os.strerror(err)}")
        self._rb = ptr

    def _on_sample(self, _ctx, data, size) -> int:
        if size != self.record_size:
            self.malformed += 1
            return 0
        off = self._off
        ctypes.memmove(self._base + off, data, size)
        off += size
        self._off = off
        if off >= self._cap:
            self._full = True
            return -1  # stop this consume round; the remaining records stay in the ring
        return 0

    def _run(self, call: Callable[[], int]) -> memoryview:
        if not self._rb:
            raise RingBufferError(errno.EBADF, "ring buffer reader is closed")
        with self._lock:
            self._off = 0
            self._full = False
            rc = call()
            if rc < 0 and not self._full and -rc != errno.EINTR:
                err = ctypes.get_errno() or -rc
                if err != errno.EINTR:
                    raise RingBufferError(err, f"ring buffer poll: {os.strerror(err)}")
            n = self._off
            self.delivered += n // self.record_size
            return memoryview(self._buf)[:n].toreadonly()

    def poll(self, timeout_ms: int = 100) -> memoryview:
        """Wait up to `timeout_ms` for records, then return up to one batch of them."""
        lib, rb = libbpf(), self._rb
        view = self._run(lambda: lib.ring_buffer__poll(rb, timeout_ms))
        return view

    def consume(self) -> bytes:
        """Return up to one batch of records already in the ring, without waiting."""
        lib, rb = libbpf(), self._rb
        return self._run(lambda: lib.ring_buffer__consume(rb))

    def drain(self) -> bytes:
        """Everything in the ring now, however many batches (for tests and shutdown)."""
        chunks = []
        while True:
            view = self.consume()
            if not len(view):
                return b"".join(chunks)
            chunks.append(bytes(view))

    def epoll_fd(self) -> int:
        return libbpf().ring_buffer__epoll_fd(self._rb)

    def _release(self) -> None:
        if self._rb:
            libbpf().ring_buffer__free(self._rb)
            self._rb = None


def pin_paths(bpffs_root: str | os.PathLike, ringbuf: str = "events",
              lost: str = "events_lost") -> tuple[Path, Path]:
    """Default pin paths of the events ring buffer and the lost counter under a bpffs root
    (the datapath may publish others; the flow component asks it first)."""
    root = Path(bpffs_root)
    return root / ringbuf, root / lost


# the kernel's ring-buffer layout (include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c)
RINGBUF_BUSY_BIT = 1 << 31
RINGBUF_DISCARD_BIT = 1 << 30
RINGBUF_HDR_SZ = 8
_PROT_READ, _PROT_WRITE, _MAP_SHARED = 0x1, 0x2, 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc: ctypes.CDLL | None = None


def _libc_fns() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


class _MapInfo(ctypes.Structure):
    """The head of `struct bpf_map_info` (what we read of it)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("_rest", ctypes.c_uint8 * 128)]


BPF_MAP_TYPE_RINGBUF = 27


def ring_size(map_fd: int) -> int:
    """The data size of a ring-buffer map (its max_entries); RingBufferError otherwise."""
    lib = _cdll()
    fn = lib["bpf_obj_get_info_by_fd"]
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p,
                                             ctypes.POINTER(ctypes.c_uint32)]
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = fn(map_fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise RingBufferError(err, f"map info of fd {map_fd}: {os.strerror(err)}")
    if info.type != BPF_MAP_TYPE_RINGBUF:
        raise RingBufferError(errno.EINVAL, f"fd {map_fd} is not a ring buffer map")
    return info.max_entries


class MappedRingReader(_RingReader):
    """Batch reader that maps the ring buffer into the process (what libbpf does inside),
    without libbpf's per-record callback: a batch is the run of committed records between
    our consumer position and the kernel's producer position, checked by their headers
    all at once and copied out with one memcpy as framed records (8-byte kernel header +
    record each, `stride` bytes apart; the data pages are mapped twice, so a run that
    wraps is still contiguous). The consumer position then moves past it at once, so the
    kernel has the whole ring again while the batch is decoded.

    Records of another size are skipped and counted in `malformed`; discarded records are
    skipped; a record still being written (BUSY) ends the batch. Waiting is an epoll on
    the map fd (the kernel wakes it on commit), with the GIL released."""

    framed = True

    def __init__(self, map_fd: int, record_size: int = 64, batch_records: int = 4096,
                 owned_fd: bool = False):
        super().__init__(map_fd, record_size, batch_records, owned_fd)
        self.stride = (record_size + RINGBUF_HDR_SZ + 7) & ~7
        self.size = ring_size(map_fd)
        self._mask = self.size - 1
        page = os.sysconf("SC_PAGE_SIZE")
        libc = _libc_fns()
        self._maps: list[tuple[int, int]] = []
        cons = libc.mmap(None, page, _PROT_READ | _PROT_WRITE, _MAP_SHARED, map_fd, 0)
        if cons in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise RingBufferError(err, f"mmap consumer page of fd {map_fd}: {os.strerror(err)}")
        self._maps.append((cons, page))
        length = page + 2 * self.size
        prod = libc.mmap(None, length, _PROT_READ, _MAP_SHARED, map_fd, page)
        if prod in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            self._unmap()
            raise RingBufferError(err, f"mmap data pages of fd {map_fd}: {os.strerror(err)}")
        self._maps.append((prod, length))
        try:
            self._epoll = select.epoll()
            self._epoll.register(map_fd, select.EPOLLIN)
        except OSError as exc:
            self._unmap()
            raise RingBufferError(exc.errno or errno.EINVAL,
                                  f"epoll on ring buffer fd {map_fd}: {exc}") from None
        self._consumer = ctypes.c_uint64.from_address(cons)
        self._producer = ctypes.c_uint64.from_address(prod)
        self._data = memoryview((ctypes.c_char * (2 * self.size)).from_address(
            prod + page)).cast("B")
        #: the header every good record has: length = record_size, no BUSY/DISCARD bit
        self._good = struct.pack("<I", record_size)
        self._hdr = struct.Struct("<I")

    def _batch(self) -> bytes:
        cons = self._consumer.value
        prod = self._producer.value
        data, mask, stride = self._data, self._mask, self.stride
        start = end = cons
        limit = self.batch_records * stride
        while end < prod and end - start < limit:
            n = min((prod - end) // stride, (limit - (end - start)) // stride)
            if n:
                # every header of the next n slots at once; the first that is not a plain
                # committed record of our size ends the fast run
                at = end & mask
                heads = data[at:at + n * stride].cast("I")[::stride // 4].tobytes()
                if heads == self._good * n:
                    end += n * stride
                    continue
                diff = int.from_bytes(heads, "little") ^ int.from_bytes(self._good * n, "little")
                end += (((diff & -diff).bit_length() - 1) // 32) * stride  # first bad slot
            if end >= prod:
                break
            # one record that is not a plain committed one of our size
            (length,) = self._hdr.unpack_from(data, end & mask)
            if length & RINGBUF_BUSY_BIT:
                break  # still being written: the batch ends here
            total = ((length & ~(RINGBUF_BUSY_BIT | RINGBUF_DISCARD_BIT)) + RINGBUF_HDR_SZ
                     + 7) & ~7
            if end > start:
                break  # hand over the good run first; this record starts the next batch
            if not length & RINGBUF_DISCARD_BIT:
                self.malformed += 1
            start = end = end + total
        n = (end - start) // stride
        at = start & mask
        batch = data[at:at + n * stride].tobytes()
        if end != cons:
            self._consumer.value = end  # one aligned 8-byte store, as the kernel reads it
        self.delivered += n
        return batch

    def poll(self, timeout_ms: int = 100) -> bytes:
        """Wait up to `timeout_ms` for records, then return up to one batch of them."""
        with self._lock:
            self._check_open()
            batch = self._batch()
            if batch or timeout_ms == 0:
                return batch
            if self._producer.value == self._consumer.value:
                try:
                    self._epoll.poll(timeout_ms / 1000 if timeout_ms > 0 else -1)
                except InterruptedError:
                    pass
            return self._batch()

    def consume(self) -> bytes:
        """Return up to one batch of records already in the ring, without waiting."""
        with self._lock:
            self._check_open()
            return self._batch()

    def records(self, batch: bytes) -> list[bytes]:
        """The records of a batch without their headers."""
        hs, size = RINGBUF_HDR_SZ, self.record_size
        return [batch[i + hs:i + hs + size] for i in range(0, len(batch), self.stride)]

    def drain(self) -> bytes:
        """Everything in the ring now, unframed, however many batches (tests, shutdown)."""
        chunks = []
        while True:
            batch = self.consume()
            if not batch:
                return b"".join(chunks)
            chunks += self.records(batch)

    def epoll_fd(self) -> int:
        return self._epoll.fileno()

    def _check_open(self) -> None:
        if not self._maps:
            raise RingBufferError(errno.EBADF, "ring buffer reader is closed")

    def _unmap(self) -> None:
        libc = _libc_fns()
        for addr, length in self._maps:
            libc.munmap(addr, length)
        self._maps = []

    def _release(self) -> None:
        if self._maps:
            self._data.release()
            self._consumer = self._producer = None
            self._unmap()
            self._epoll.close()
