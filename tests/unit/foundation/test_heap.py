"""Handing freed heap pages back: the trim runs once, after a burst of changes ends."""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys

import pytest
from pylium import heap

#: runs in a fresh interpreter: the allocator state of a process that ran other tests
#: (thresholds glibc moved, arenas of other threads) would decide what free() keeps
_PROBE = """
import json
from pylium import heap

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

before = rss()
blocks, pins = [], []
for _ in range(400):  # ~25 MiB touched, each block followed by a small live one
    blocks.append(bytearray(64 * 1024))
    pins.append(bytearray(600))  # keeps free() from shrinking the heap by itself
grown = rss()
del blocks
freed = rss()
trimmed = heap.release_free_heap()
print(json.dumps({"before": before, "grown": grown, "freed": freed, "after": rss(),
                  "trimmed": trimmed, "pins": len(pins)}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_heap_returns_pages_on_glibc():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         check=True, timeout=60)
    rss = json.loads(out.stdout)
    assert rss["trimmed"] is True
    assert rss["grown"] - rss["before"] > 20_000
    assert rss["freed"] > rss["grown"] - 5_000  # free() kept the pages...
    assert rss["after"] < rss["grown"] - 20_000  # ...the trim handed them back


def test_trimmer_runs_once_after_the_burst():
    calls = []

    async def main():
        trimmer = heap.Trimmer(calls.append, idle=0.05)
        for _ in range(10):
            trimmer.touch()
            await asyncio.sleep(0.01)
        assert calls == []  # still churning
        await asyncio.sleep(0.1)
        assert calls == [heap.release_free_heap] if heap._TRIM is not None else calls == []
        trimmer.touch()
        trimmer.cancel()
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert len(calls) == (1 if heap._TRIM is not None else 0)


def test_trimmer_survives_a_closed_executor():
    def closed(_func):
        raise RuntimeError("cannot schedule new futures after shutdown")

    async def main():
        trimmer = heap.Trimmer(closed, idle=0.01)
        trimmer.touch()
        await asyncio.sleep(0.05)

    asyncio.run(main())

