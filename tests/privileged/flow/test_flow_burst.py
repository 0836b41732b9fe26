"""Burst test: N events generated in the kernel's ring buffer by a real BPF program (through
the datapath's own emit_event), read by the flow observer from the pinned maps:
N == delivered + counted-lost, exactly, with every delivered event seen once."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from pylium.datapath import libbpf
from pylium.datapath.loader import load_object
from pylium.datapath.ringbuf import MappedRingReader
from pylium.flow.component import FlowObserver
from pylium.flow.metrics import make_registry
from pylium.flow.model import LOST_KERNEL, Flow, LostEvent

HERE = Path(__file__).resolve().parent


@pytest.fixture
def burst_prog(tmp_path):
    subprocess.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", shell=True,
                   check=True)
    pin_dir = Path(f"/sys/fs/bpf/pylium-test-flow-{uuid.uuid4().hex[:8]}")
    pin_dir.mkdir()
    try:
        with load_object(HERE / "burst.bpf.c", cache_dir=tmp_path, pin_root=pin_dir,
                         pinned_maps=("events", "events_lost"), require_pinned=True) as obj:
            yield obj.program("burst"), pin_dir / "events", pin_dir / "events_lost"
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


PACKET = bytes(64)  # the program does not look at the packet


def run_burst(prog_fd: int, n: int) -> None:
    retval, _dur, _out, _ctx = libbpf.test_run(prog_fd, PACKET, repeat=n)
    assert retval == 0  # TC_ACT_OK


def delivered_seqs(observer: FlowObserver) -> list[int]:
    return [r.pkt_len for r in observer.ring.snapshot() if type(r) is Flow]


def kernel_lost_records(observer: FlowObserver) -> int:
    return sum(r.num_events_lost for r in observer.ring.snapshot()
               if type(r) is LostEvent and r.source == LOST_KERNEL)


def test_burst_every_event_delivered_or_counted(burst_prog):
    prog_fd, ring_pin, lost_pin = burst_prog
    observer = FlowObserver("burst-node", capacity=1 << 20, batch_records=1024)
    observer.attach(ring_pin, lost_pin, start_thread=False)
    # the ring is read through its mapping (no per-record libbpf callback)
    assert isinstance(observer.reader, MappedRingReader)
    try:
        # phase 1: nobody reads while 40,000 events arrive; the 1 MiB ring holds ~14.5k
        n1 = 40_000
        run_burst(prog_fd, n1)
        while observer.pump(0):
            pass
        observer.check_kernel_lost()
        seqs = delivered_seqs(observer)
        assert observer.kernel_lost > 0 and seqs
        assert len(seqs) + observer.kernel_lost == n1
        # with no reader, the first ones fit and every later one was lost
        assert seqs == list(range(1, len(seqs) + 1))

        # phase 2: the reader thread runs while 300,000 more arrive as fast as the kernel
        # can make them
        observer._thread = threading.Thread(target=observer._run, daemon=True)
        observer._thread.start()
        n2 = 300_000
        run_burst(prog_fd, n2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            before = observer.decoder.decoded
            time.sleep(0.5)
            if observer.decoder.decoded == before:
                break
        observer.stop_reader()  # joins the thread, then drains what is left
        total = n1 + n2
        seqs = delivered_seqs(observer)
        assert len(seqs) == observer.decoder.decoded
        assert len(set(seqs)) == len(seqs), "an event was delivered twice"
        assert set(seqs) <= set(range(1, total + 1))
        assert observer.decoder.decoded + observer.kernel_lost == total
        # the losses are reported in the flow stream and as a metric, exactly
        assert kernel_lost_records(observer) == observer.kernel_lost
        registry, _ = make_registry(observer)
        assert registry.get_sample_value("pylium_events_lost_total",
                                         {"source": "datapath_ring_buffer"}) == observer.kernel_lost
        print(f"burst: {total} events, {observer.decoder.decoded} delivered, "
              f"{observer.kernel_lost} lost in the kernel ring buffer")
    finally:
        observer.stop_reader()
    assert observer.reader is None and os.path.exists(ring_pin)
