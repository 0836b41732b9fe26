"""Both ring-buffer readers share one close path: `with` closes the fd the reader owns,
closing twice is harmless, and a closed reader refuses to read (no use of freed memory)."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest
from pylium.datapath import libbpf
from pylium.datapath.ringbuf import (
    BPF_MAP_TYPE_RINGBUF,
    MappedRingReader,
    RingBufferError,
    RingBufferReader,
)

READERS = [RingBufferReader, MappedRingReader]


@pytest.fixture
def pinned_ring():
    fd = libbpf.map_create(BPF_MAP_TYPE_RINGBUF, "tidy_rb", 0, 0, 4096 * 4)
    path = Path(f"/sys/fs/bpf/pylium-tidy-rb-{uuid.uuid4().hex[:8]}")
    try:
        libbpf.obj_pin(fd, str(path))
        yield path
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.parametrize("reader_cls", READERS, ids=lambda c: c.__name__)
def test_context_manager_closes_the_owned_fd(pinned_ring, reader_cls):
    with reader_cls.open_pinned(pinned_ring, record_size=64) as reader:
        fd = reader.map_fd
        assert _fd_open(fd)
        assert reader.consume() == b""
    assert reader.map_fd == -1
    assert not _fd_open(fd)
    reader.close()  # a second close is a no-op
    with pytest.raises(RingBufferError) as exc:
        reader.consume()
    assert exc.value.errno == errno.EBADF


@pytest.mark.parametrize("reader_cls", READERS, ids=lambda c: c.__name__)
def test_borrowed_fd_stays_open(pinned_ring, reader_cls):
    fd = libbpf.obj_get(str(pinned_ring))
    try:
        with reader_cls(fd, record_size=64) as reader:
            assert reader.poll(0) == b""
        assert reader.map_fd == fd and _fd_open(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("reader_cls", READERS, ids=lambda c: c.__name__)
def test_bad_sizes_rejected_before_opening_anything(reader_cls):
    with pytest.raises(ValueError):
        reader_cls(-1, record_size=0)


def test_one_close_path_for_both_readers():
    for cls in READERS:
        for name in ("close", "__enter__", "__exit__", "open_pinned"):
            assert name not in vars(cls), f"{cls.__name__} defines its own {name}"
