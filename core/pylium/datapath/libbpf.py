"""ctypes binding over Debian's `libbpf.so.1` (libbpf 1.1): the only module that calls it.

`lib` opens the library on first use (never at import) with argument/result types declared
for every function pylium uses; `capture_log()` routes libbpf's messages into a buffer the
loader reads on failure. The thin wrappers below turn libbpf's negative-errno results into
`DatapathError`s that name the operation."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_uint32,
    c_uint64,
    c_void_p,
)

from pylium.errors import PyliumError


class DatapathError(PyliumError):
    """A BPF or netlink operation failed; the message names the operation and errno."""


def _open_cdll() -> ctypes.CDLL:
    for name in ("libbpf.so.1", ctypes.util.find_library("bpf")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    raise DatapathError("libbpf.so.1 not found: install Debian's libbpf1 (apt-get install libbpf-dev)")


#: name -> (restype, argtypes) of every function pylium calls through `lib`
_SIGNATURES: dict[str, tuple[object, list]] = {}


class _Library:
    """libbpf.so.1, opened on first use rather than at import (importing pylium must work,
    and change nothing, on a host without libbpf). Declared functions become plain
    attributes once open, so a call costs no more than on the CDLL itself."""

    def __init__(self) -> None:
        self._cdll: ctypes.CDLL | None = None
        self._lock = threading.Lock()

    def _open(self) -> ctypes.CDLL:
        with self._lock:
            if self._cdll is None:
                cdll = _open_cdll()
                for name, (restype, argtypes) in _SIGNATURES.items():
                    fn = getattr(cdll, name)
                    fn.restype, fn.argtypes = restype, argtypes
                    setattr(self, name, fn)
                self._cdll = cdll
            return self._cdll

    @property
    def loaded(self) -> bool:
        return self._cdll is not None

    def __getattr__(self, name: str):
        return getattr(self._cdll or self._open(), name)

    def __getitem__(self, name: str):
        return (self._cdll or self._open())[name]


lib = _Library()

# map types / flags / attach points used by pylium
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_HASH_OF_MAPS = 13
BPF_MAP_TYPE_RINGBUF = 27
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_NO_PREALLOC = 1
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1


class BpfMapCreateOpts(Structure):
    """libbpf `struct bpf_map_create_opts` (libbpf 1.1)."""

    _fields_ = [("sz", c_size_t), ("btf_fd", c_uint32), ("btf_key_type_id", c_uint32),
                ("btf_value_type_id", c_uint32), ("btf_vmlinux_value_type_id", c_uint32),
                ("inner_map_fd", c_uint32), ("map_flags", c_uint32), ("map_extra", c_uint64),
                ("numa_node", c_uint32), ("map_ifindex", c_uint32)]


class BpfTestRunOpts(Structure):
    """libbpf `struct bpf_test_run_opts`."""

    _fields_ = [("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
                ("data_size_in", c_uint32), ("data_size_out", c_uint32),
                ("ctx_in", c_void_p), ("ctx_out", c_void_p),
                ("ctx_size_in", c_uint32), ("ctx_size_out", c_uint32),
                ("retval", c_uint32), ("repeat", c_int), ("duration", c_uint32),
                ("flags", c_uint32), ("cpu", c_uint32), ("batch_size", c_uint32)]


class BpfTcHook(Structure):
    """libbpf `struct bpf_tc_hook`."""

    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int),
                ("parent", c_uint32)]


class BpfTcOpts(Structure):
    """libbpf `struct bpf_tc_opts`."""

    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_uint32),
                ("prog_id", c_uint32), ("handle", c_uint32), ("priority", c_uint32)]


class BpfMapInfo(Structure):
    """Kernel `struct bpf_map_info` (the prefix pylium reads)."""

    _fields_ = [("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32),
                ("value_size", c_uint32), ("max_entries", c_uint32), ("map_flags", c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", c_uint32),
                ("btf_vmlinux_value_type_id", c_uint32), ("netns_dev", c_uint64),
                ("netns_ino", c_uint64), ("btf_id", c_uint32), ("btf_key_type_id", c_uint32),
                ("btf_value_type_id", c_uint32), ("pad", c_uint32), ("map_extra", c_uint64)]


class BpfProgInfo(Structure):
    """Kernel `struct bpf_prog_info` (the prefix pylium reads: type, id, tag)."""

    _fields_ = [("type", c_uint32), ("id", c_uint32), ("tag", ctypes.c_uint8 * 8)]


def _declare(name: str, restype, *argtypes) -> None:
    _SIGNATURES[name] = (restype, list(argtypes))


_declare("bpf_map_update_batch", c_int, c_int, c_void_p, c_void_p, POINTER(c_uint32), c_void_p)
_declare("bpf_map_lookup_batch", c_int, c_int, c_void_p, c_void_p, c_void_p, c_void_p,
         POINTER(c_uint32), c_void_p)
_declare("bpf_prog_attach", c_int, c_int, c_int, c_uint, c_uint)
_declare("bpf_prog_detach2", c_int, c_int, c_int, c_uint)
_declare("bpf_xdp_attach", c_int, c_int, c_int, c_uint32, c_void_p)
_declare("bpf_xdp_detach", c_int, c_int, c_uint32, c_void_p)
_declare("bpf_object__open_file", c_void_p, c_char_p, c_void_p)
_declare("bpf_object__load", c_int, c_void_p)
_declare("bpf_object__close", None, c_void_p)
_declare("bpf_object__find_map_by_name", c_void_p, c_void_p, c_char_p)
_declare("bpf_object__find_program_by_name", c_void_p, c_void_p, c_char_p)
_declare("bpf_map__set_pin_path", c_int, c_void_p, c_char_p)
_declare("bpf_map__fd", c_int, c_void_p)
_declare("bpf_map__set_initial_value", c_int, c_void_p, c_void_p, c_size_t)
_declare("bpf_map__reuse_fd", c_int, c_void_p, c_int)
_declare("bpf_program__fd", c_int, c_void_p)
_declare("bpf_map_create", c_int, c_int, c_char_p, c_uint32, c_uint32, c_uint32,
         POINTER(BpfMapCreateOpts))
_declare("bpf_map_update_elem", c_int, c_int, c_void_p, c_void_p, c_uint64)
_declare("bpf_map_lookup_elem", c_int, c_int, c_void_p, c_void_p)
_declare("bpf_map_delete_elem", c_int, c_int, c_void_p)
_declare("bpf_map_get_next_key", c_int, c_int, c_void_p, c_void_p)
_declare("bpf_map_get_fd_by_id", c_int, c_uint32)
_declare("bpf_prog_get_fd_by_id", c_int, c_uint32)
_declare("bpf_obj_pin", c_int, c_int, c_char_p)
_declare("bpf_obj_get", c_int, c_char_p)
_declare("bpf_obj_get_info_by_fd", c_int, c_int, c_void_p, POINTER(c_uint32))
_declare("bpf_prog_test_run_opts", c_int, c_int, POINTER(BpfTestRunOpts))
_declare("bpf_tc_hook_create", c_int, POINTER(BpfTcHook))
_declare("bpf_tc_hook_destroy", c_int, POINTER(BpfTcHook))
_declare("bpf_tc_attach", c_int, POINTER(BpfTcHook), POINTER(BpfTcOpts))
_declare("bpf_tc_detach", c_int, POINTER(BpfTcHook), POINTER(BpfTcOpts))
_declare("bpf_tc_query", c_int, POINTER(BpfTcHook), POINTER(BpfTcOpts))
_declare("libbpf_num_possible_cpus", c_int)
_declare("libbpf_get_error", ctypes.c_long, c_void_p)
_declare("libbpf_set_print", c_void_p, c_void_p)
_declare("bpf_object__next_program", c_void_p, c_void_p, c_void_p)
_declare("bpf_object__next_map", c_void_p, c_void_p, c_void_p)
_declare("bpf_program__name", c_char_p, c_void_p)
_declare("bpf_map__name", c_char_p, c_void_p)

_ = (c_bool, c_uint)  # re-exported types for modules building on `lib`


log = logging.getLogger(__name__)

# -- libbpf's own messages ------------------------------------------------------------
# libbpf prints its warnings (verifier log, BTF mismatches) through one process-wide
# callback. `capture_log()` installs ours the first time something is loaded, never at
# import: importing pylium must not change what libbpf does for the rest of the process.

_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
LOG_KEEP = 200
_log_lines: list[str] = []
_log_lock = threading.Lock()
_vsnprintf = None
_printer = None  # the installed callback; kept referenced so ctypes does not free it


def _libbpf_print(level: int, fmt: bytes, args: int) -> int:
    buf = ctypes.create_string_buffer(4096)
    _vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    if level in (0, 1):  # LIBBPF_WARN, LIBBPF_INFO (LIBBPF_DEBUG is dropped)
        with _log_lock:
            _log_lines.append(text)
            del _log_lines[:-LOG_KEEP]
        log.debug("libbpf: %s", text)
    return 0


def capture_log() -> None:
    """Route libbpf's messages into our buffer (read with `log_tail`). Idempotent."""
    global _vsnprintf, _printer
    with _log_lock:
        if _printer is not None:
            return
        vsnprintf = ctypes.CDLL(None).vsnprintf
        vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
        _vsnprintf = vsnprintf
        _printer = _PRINT_FN(_libbpf_print)
        lib.libbpf_set_print(ctypes.cast(_printer, c_void_p))


def clear_log() -> None:
    with _log_lock:
        del _log_lines[:]


def log_tail(lines: int = 30) -> list[str]:
    """The last libbpf messages captured (after `capture_log()`)."""
    with _log_lock:
        return list(_log_lines[-lines:])


def check(rc: int, what: str) -> int:
    """Raise DatapathError for a negative libbpf result (libbpf 1.x returns -errno)."""
    if rc < 0:
        err = -rc if rc != -1 else ctypes.get_errno() or errno.EINVAL
        raise DatapathError(f"{what}: {os.strerror(err)} (errno {err})")
    return rc


def errno_of(rc: int) -> int:
    return -rc if rc < -1 else ctypes.get_errno()


def possible_cpus() -> int:
    return check(lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def obj_get(path: str) -> int:
    return check(lib.bpf_obj_get(path.encode()), f"bpf_obj_get {path}")


def obj_pin(fd: int, path: str) -> None:
    check(lib.bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin {path}")


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = c_uint32(ctypes.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
          "bpf_obj_get_info_by_fd(map)")
    return info


def prog_info(fd: int) -> BpfProgInfo:
    info = BpfProgInfo()
    size = c_uint32(ctypes.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
          "bpf_obj_get_info_by_fd(prog)")
    return info


def map_get_fd_by_id(map_id: int) -> int:
    return check(lib.bpf_map_get_fd_by_id(map_id), f"bpf_map_get_fd_by_id {map_id}")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, inner_map_fd: int = 0) -> int:
    opts = BpfMapCreateOpts(sz=ctypes.sizeof(BpfMapCreateOpts), map_flags=flags,
                            inner_map_fd=inner_map_fd)
    return check(lib.bpf_map_create(map_type, name.encode()[:15], key_size, value_size,
                                    max_entries, ctypes.byref(opts)),
                 f"bpf_map_create {name}")


def test_run(prog_fd: int, data: bytes, ctx: Structure | None = None, repeat: int = 1,
             data_out_size: int = 0) -> tuple[int, int, bytes, Structure | None]:
    """BPF_PROG_TEST_RUN: (retval, duration ns per run, data out, ctx out)."""
    buf_in = ctypes.create_string_buffer(data, len(data))
    out_size = data_out_size or len(data) + 256
    buf_out = ctypes.create_string_buffer(out_size)
    opts = BpfTestRunOpts(sz=ctypes.sizeof(BpfTestRunOpts), data_in=ctypes.addressof(buf_in),
                          data_out=ctypes.addressof(buf_out), data_size_in=len(data),
                          data_size_out=out_size, repeat=repeat)
    ctx_buf = None
    if ctx is not None:
        # the kernel copies its whole context out (ENOSPC if the buffer is smaller): give
        # it room, then read back the prefix `ctx`'s type describes
        ctx_buf = ctypes.create_string_buffer(max(1024, ctypes.sizeof(ctx)))
        opts.ctx_in = ctypes.addressof(ctx)
        opts.ctx_size_in = ctypes.sizeof(ctx)
        opts.ctx_out = ctypes.addressof(ctx_buf)
        opts.ctx_size_out = len(ctx_buf)
    check(lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    ctx_out = type(ctx).from_buffer_copy(ctx_buf.raw[:ctypes.sizeof(ctx)]) if ctx is not None else None
    return opts.retval, opts.duration, buf_out.raw[:opts.data_size_out], ctx_out


def close(fd: int) -> None:
    if fd is not None and fd >= 0:
        os.close(fd)
