"""Giving freed heap memory back to the system.

A create or delete of an endpoint frees most of what it allocated, but the C allocator
(glibc) keeps freed pages in its arenas: one per thread that ever allocated, and the
agent's worker threads (netlink, BPF, state files, KV store) each churn their own. Those
pages stay in the agent's RSS until `malloc_trim` hands back every whole free page. The
agent asks for that once endpoint churn pauses (`Trimmer`), not after every operation: a
trim walks every arena and costs about a millisecond."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

#: seconds without endpoint churn after which freed pages are handed back
IDLE_S = 0.5


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # ctypes releases the GIL around the call
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _load_trim()


def release_free_heap() -> bool:
    """Return the allocator's whole free pages to the system; False where the C library
    cannot (not glibc)."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


class Trimmer:
    """Calls `release_free_heap` on `run` (an executor-taking callable) `idle` seconds
    after the last `touch`: a burst of endpoint changes trims once, when it ends."""

    def __init__(self, run: Callable[[Callable[[], bool]], object], idle: float = IDLE_S):
        self.run = run
        self.idle = idle
        self._timer: asyncio.TimerHandle | None = None

    def touch(self) -> None:
        """Something freed memory: (re)arm the timer (on the event loop's thread)."""
        if _TRIM is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.idle, self._fire)

    def _fire(self) -> None:
        self._timer = None
        try:
            self.run(release_free_heap)
        except RuntimeError:  # the executor is shut down: the agent is stopping
            log.debug("heap trim skipped: executor closed")

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
