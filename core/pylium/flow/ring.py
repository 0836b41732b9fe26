"""The agent's bounded in-memory ring of flow records (Hubble's ring buffer).

Writers (the ring-buffer reader thread) append batches under a lock; every record gets a
sequence number. Readers remember the next sequence they want: when the ring has already
overwritten it, the reader is told exactly how many records it missed (a `LostEvent` with
source HUBBLE_RING_BUFFER), which is how a slow `observe --follow` client is accounted for.
Asyncio followers are woken once per appended batch, thread-safely.

A proxy's L7 flows are kept as their parts (`extend_l7`: the raw record, its connection
side's head, the batch's time, the record's recurring prefix, each in a slot list of its
own) and become `L7Flow`s only when read: taking them allocates nothing per flow, and
overwriting them frees only the raw record. A proxy sends two flows per request, all the
time, and most are never read."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from typing import Any

from pylium.flow.model import LOST_FOLLOWER, Flow, LostEvent, l7_flow

Record = Flow | LostEvent


class FlowRing:
    def __init__(self, capacity: int = 65536, node_name: str = ""):
        if capacity <= 0:
            raise ValueError("flow ring capacity must be positive")
        self.capacity = capacity
        self.node_name = node_name
        #: per slot: its record, or (where `_heads` has a head) a lazy L7 flow's raw record
        self._slots: list[Record | bytes | None] = [None] * capacity
        #: per slot: None, or the head of the lazy L7 flow it holds (`extend_l7`)
        self._heads: list[tuple | None] = [None] * capacity
        #: per slot with a head: its flow's time, and the prefix of its raw record (b"":
        #: none; a proxy sends a recurring one once, `pylium.l7.parser.FastRecord`)
        self._times: list[int] = [0] * capacity
        self._prefixes: list[bytes] = [b""] * capacity
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
        if records:
            lost = () if flows_only else [r for r in records if type(r) is LostEvent]
            self._store(records, None, None, lost)

    def extend_l7(self, time_ns: int, heads: list[tuple], raws: list[bytes],
                  prefixes: list[bytes] | None = None) -> None:
        """Append the L7 flows of a proxy's records `raws` at `time_ns`, each with its
        connection side's head and the prefix of its record if `prefixes` (`l7_flow` of
        head, prefix + raw), kept as those parts until read."""
        if len(heads) != len(raws) or prefixes is not None and len(prefixes) != len(raws):
            raise ValueError(f"{len(raws)} L7 records with {len(heads)} heads"
                             + ("" if prefixes is None else f", {len(prefixes)} prefixes"))
        if raws:
            self._store(raws, heads, [time_ns] * len(raws), (),
                        [b""] * len(raws) if prefixes is None else prefixes)

    def _store(self, records: list, heads: list | None, times: list | None,
               lost: Iterable[LostEvent], prefixes: list | None = None) -> None:
        cap = self.capacity
        total = len(records)
        if total > cap:  # only the newest fit; readers see the rest as missed
            records = records[-cap:]
            heads = None if heads is None else heads[-cap:]
            times = None if times is None else times[-cap:]
            prefixes = None if prefixes is None else prefixes[-cap:]
        n = len(records)
        with self._lock:
            start = self.head + (total - n)
            pos = start % cap
            self._put(self._slots, pos, records)
            self._put(self._heads, pos, [None] * n if heads is None else heads)
            if times is not None:
                self._put(self._times, pos, times)
            if prefixes is not None:
                self._put(self._prefixes, pos, prefixes)
            self.head = start + n
            for rec in lost:
                self.lost_by_source[rec.source] = (
                    self.lost_by_source.get(rec.source, 0) + rec.num_events_lost)
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                self._waiters.discard((loop, event))

    def _put(self, slots: list, pos: int, values: list) -> None:
        """`values` (at most `capacity`) into `slots` from `pos` on, wrapping round."""
        first = self.capacity - pos
        if len(values) <= first:
            slots[pos:pos + len(values)] = values
        else:
            slots[pos:] = values[:first]
            slots[:len(values) - first] = values[first:]

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
            parts = self._copy(start, head)
        return self._records(*parts), missed, head

    def _copy(self, start: int, end: int) -> tuple[list, ...]:
        """The slots, heads, times and prefixes from sequence `start` to `end` (under the
        lock)."""
        if end <= start:
            return [], [], [], []
        cap = self.capacity
        a, b = start % cap, end % cap
        lists = (self._slots, self._heads, self._times, self._prefixes)
        if a < b:
            return tuple(values[a:b] for values in lists)
        return tuple(values[a:] + values[:b] for values in lists)

    @staticmethod
    def _records(slots: list, heads: list, times: list, prefixes: list) -> list[Record]:
        """Copied slots as records: the lazy L7 flows among them built (outside the lock)."""
        if heads.count(None) == len(heads):
            return slots
        return [raw if head is None else l7_flow(time_ns, head, prefix + raw)
                for raw, head, time_ns, prefix in zip(slots, heads, times, prefixes,
                                                      strict=True)]

    def snapshot(self) -> list[Record]:
        with self._lock:
            parts = self._copy(self.oldest, self.head)
        return self._records(*parts)

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
