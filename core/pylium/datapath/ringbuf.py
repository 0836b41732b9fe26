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
import threading
from collections.abc import Callable
from pathlib import Path

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


class RingBufferReader:
    """Batch reader over one ring-buffer map fd.

    `poll(timeout_ms)` / `consume()` return a `memoryview` over the records copied since the
    last call, each exactly `record_size` bytes (records of another size are counted in
    `malformed` and skipped). The view is valid until the next poll/consume. Calls release
    the GIL while waiting in the kernel (ctypes CDLL), so a reader thread costs nothing idle.
    """

    def __init__(self, map_fd: int, record_size: int = 64, batch_records: int = 4096,
                 owned_fd: bool = False):
        if record_size <= 0 or batch_records <= 0:
            raise ValueError("record_size and batch_records must be positive")
        self.map_fd = map_fd
        self.record_size = record_size
        self.batch_records = batch_records
        self._owned_fd = owned_fd
        self._buf = ctypes.create_string_buffer(record_size * batch_records)
        self._base = ctypes.addressof(self._buf)
        self._cap = record_size * batch_records
        self._off = 0
        self._full = False
        #: records seen with an unexpected size (never expected; counted, not silent)
        self.malformed = 0
        #: records handed to the caller so far
        self.delivered = 0
        self._lock = threading.Lock()
        self._cb = SAMPLE_FN(self._on_sample)  # keep a reference for libbpf's lifetime
        lib = libbpf()
        ptr = lib.ring_buffer__new(map_fd, self._cb, None, None)
        if not ptr:
            err = ctypes.get_errno() or errno.EINVAL
            raise RingBufferError(err, f"ring_buffer__new(fd {map_fd}): {os.strerror(err)}")
        self._rb = ptr

    @classmethod
    def open_pinned(cls, path: str | os.PathLike, **kw) -> RingBufferReader:
        fd = open_pinned(path)
        try:
            return cls(fd, owned_fd=True, **kw)
        except BaseException:
            os.close(fd)
            raise

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

    def consume(self) -> memoryview:
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

    def close(self) -> None:
        with self._lock:
            if self._rb:
                libbpf().ring_buffer__free(self._rb)
                self._rb = None
            if self._owned_fd and self.map_fd >= 0:
                os.close(self.map_fd)
                self.map_fd = -1

    def __enter__(self) -> RingBufferReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pin_paths(bpffs_root: str | os.PathLike, ringbuf: str = "events",
              lost: str = "events_lost") -> tuple[Path, Path]:
    """Default pin paths of the events ring buffer and the lost counter under a bpffs root
    (the datapath may publish others; the flow component asks it first)."""
    root = Path(bpffs_root)
    return root / ringbuf, root / lost
