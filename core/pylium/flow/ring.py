"""The agent's bounded in-memory ring of flow records (Hubble's ring buffer).

Writers (the ring-buffer reader thread) append batches under a lock; every record gets a
sequence number. Readers remember the next sequence they want: when the ring has already
overwritten it, the reader is told exactly how many records it missed (a `LostEvent` with
source HUBBLE_RING_BUFFER), which is how a slow `observe --follow` client is accounted for.
Asyncio followers are woken once per appended batch, thread-safely."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from typing import Any

from pylium.flow.model import LOST_FOLLOWER, Flow, LostEvent

Record = Flow | LostEvent


class FlowRing:
    def __init__(self, capacity: int = 65536, node_name: str = ""):
        if capacity <= 0:
            raise ValueError("flow ring capacity must be positive")
        self.capacity = capacity
        self.node_name = node_name
        self._slots: list[Record | None] = [None] * capacity
        #: sequence number the next appended record gets (= records ever appended)
        self.head = 0
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        #: records skipped by readers that fell behind (summed over readers)
        self.follower_lost = 0
        #: lost events by source (totals of every LostEvent appended)
        self.lost_by_source: dict[str, int] = {}

    @property
    def oldest(self) -> int:
        return max(0, self.head - self.capacity)

    def __len__(self) -> int:
        return self.head - self.oldest

    def extend(self, records: Iterable[Record], flows_only: bool = False) -> None:
        """Append in order; `flows_only` (the decoder's batches) skips the LostEvent scan."""
        records = records if type(records) is list else list(records)
        if not records:
            return
        cap = self.capacity
        total = len(records)
        lost = [] if flows_only else [r for r in records if type(r) is LostEvent]
        if total > cap:
            records = records[-cap:]  # only the newest fit; readers see the rest as missed
        with self._lock:
            start = self.head + (total - len(records))
            pos = start % cap
            first = min(len(records), cap - pos)
            self._slots[pos:pos + first] = records[:first]
            if first < len(records):
                self._slots[0:len(records) - first] = records[first:]
            self.head = start + len(records)
            for rec in lost:
                self.lost_by_source[rec.source] = (
                    self.lost_by_source.get(rec.source, 0) + rec.num_events_lost)
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                self._waiters.discard((loop, event))

    def append_lost(self, source: str, count: int, cpu: int | None = None) -> None:
        if count > 0:
            self.extend([LostEvent(time.time_ns(), self.node_name, source, count, cpu)])

    def read(self, start: int) -> tuple[list[Record], int, int]:
        """Records from sequence `start` up to the head: (records, missed, next_start).
        `missed` counts those already overwritten (start was behind the ring)."""
        with self._lock:
            head, oldest = self.head, max(0, self.head - self.capacity)
            missed = max(0, oldest - start)
            start = max(start, oldest)
            out = self._copy(start, head)
        return out, missed, head

    def _copy(self, start: int, end: int) -> list[Record]:
        if end <= start:
            return []
        cap = self.capacity
        a, b = start % cap, end % cap
        if a < b:
            return self._slots[a:b]  # type: ignore[return-value]
        return self._slots[a:] + self._slots[:b]  # type: ignore[operator]

    def snapshot(self) -> list[Record]:
        with self._lock:
            return self._copy(self.oldest, self.head)

    async def follow(self, start: int | None = None, stop: asyncio.Event | None = None):
        """Async iterator over batches from `start` (default: now) forever; a batch begins
        with a LostEvent when this reader fell behind the ring; an empty batch each second
        of silence."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        token = (loop, event)
        self._waiters.add(token)
        try:
            pos = self.head if start is None else start
            while stop is None or not stop.is_set():
                records, missed, pos = self.read(pos)
                if missed:
                    with self._lock:
                        self.follower_lost += missed
                    lost = LostEvent(time.time_ns(), self.node_name, LOST_FOLLOWER, missed)
                    records = [lost, *records]
                if records:
                    yield records
                    continue
                event.clear()
                if self.head != pos:
                    continue
                try:
                    await asyncio.wait_for(event.wait(), timeout=1.0)
                except TimeoutError:
                    yield []  # a heartbeat: lets the consumer notice a gone client
        finally:
            self._waiters.discard(token)

    def stats(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "stored": len(self), "seen": self.head,
                "follower_lost": self.follower_lost, "lost_by_source": dict(self.lost_by_source)}
