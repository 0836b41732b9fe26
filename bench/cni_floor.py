"""The kernel's floor under a 20-pod CNI burst: the work pylium's agent asks of the kernel
for each pod (veth born with its peer in the pod's netns, the pod's address, neighbour and
default route, the host's /32 route and neighbour, the host end's sysctls, clsact and two
tc programs), done for 20 pods back to back from one tight loop with no agent, no HTTP, no
IPAM, no event loop. The 10th pod's finish time is the best p50 a burst of 20 concurrent
ADDs could reach on this machine if nothing but the kernel work were on the path (rtnl_lock
serialises link creation anyway). Runs in namespaces of its own (a "host" netns stands for
the node); everything is removed at the end.

    .venv/bin/python bench/cni_floor.py        # env FLOOR_ROUNDS (default 5)
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pylium.datapath import libbpf, tc  # noqa: E402
from pylium.datapath import netns as plumbing  # noqa: E402

PODS = 20
ROUNDS = int(os.environ.get("FLOOR_ROUNDS", "5"))
BPF_PROG_TYPE_SCHED_CLS = 3


def trivial_tc_program() -> int:
    """`return TC_ACT_OK` (r0 = 0; exit): the program's size does not change tc's work."""
    insns = bytes.fromhex("b700000000000000" "9500000000000000")
    buf = ctypes.create_string_buffer(insns, len(insns))
    fn = libbpf.lib.bpf_prog_load
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p,
                   ctypes.c_size_t, ctypes.c_void_p]
    return libbpf.check(fn(BPF_PROG_TYPE_SCHED_CLS, b"floor", b"GPL", buf, 2, None),
                        "loading the floor's tc program")


def one_round(host_ns: str, pods: list[str], prog: int, tag: str) -> dict[str, list[float]]:
    """Wire every pod back to back on one thread inside `host_ns`; finish times (ms since
    the round's start) and each pod's own time, then unwire them all."""
    out: dict[str, list[float]] = {"finish": [], "each": [], "tc": []}

    def on_host(link: plumbing.LinkInfo) -> None:
        t = time.perf_counter()
        from pylium.datapath.proxy import prepare_endpoint_veth

        prepare_endpoint_veth(link.ifindex)
        tc.attach_both(link.ifindex, prog, prog)
        out["tc"].append((time.perf_counter() - t) * 1000)

    def body() -> None:
        start = time.perf_counter()
        for i, pod in enumerate(pods):
            t = time.perf_counter()
            plumbing.wire_endpoint(f"fl{tag}{i}", pod, f"10.79.0.{i + 2}", "10.79.0.1",
                                   on_host_link=on_host)
            now = time.perf_counter()
            out["each"].append((now - t) * 1000)
            out["finish"].append((now - start) * 1000)
        for i, _pod in enumerate(pods):
            plumbing.unwire_endpoint(f"fl{tag}{i}", f"10.79.0.{i + 2}")

    plumbing.run_in_netns(host_ns, body)
    return out


def busy(stop: threading.Event) -> None:
    """FLOOR_BUSY=1: a thread that keeps the GIL busy the way the agent's event loop does
    in a burst (Python work in short stretches between short syscalls), to show what the
    GIL hand-offs cost the wiring thread."""
    import select

    poller = select.epoll()
    while not stop.is_set():
        sum(i * i for i in range(300))  # ~20-40 us of bytecode
        poller.poll(0)


def main() -> None:
    stop = threading.Event()
    if os.environ.get("FLOOR_BUSY"):
        threading.Thread(target=busy, args=(stop,), daemon=True).start()
    suffix = secrets.token_hex(3)
    host = f"fl{suffix}-host"
    pods = [f"fl{suffix}-p{i}" for i in range(PODS)]
    made = []
    prog = trivial_tc_program()
    try:
        for name in [host, *pods]:
            plumbing.create_netns(name)
            made.append(name)
        one_round(host, pods, prog, "w")  # warm: page cache, first-use costs
        tenth, last, each, tcs = [], [], [], []
        for r in range(ROUNDS):
            out = one_round(host, pods, prog, f"{r}x")
            tenth.append(out["finish"][PODS // 2 - 1])
            last.append(out["finish"][-1])
            each += out["each"]
            tcs += out["tc"]
        print(json.dumps({
            "bench": "cni_floor", "pods": PODS, "rounds": ROUNDS,
            "tenth_pod_done_ms_median": round(statistics.median(tenth), 2),
            "tenth_pod_done_ms_range": [round(min(tenth), 2), round(max(tenth), 2)],
            "last_pod_done_ms_median": round(statistics.median(last), 2),
            "per_pod_ms_median": round(statistics.median(each), 3),
            "tc_and_sysctls_ms_median": round(statistics.median(tcs), 3),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}))
    finally:
        stop.set()
        for name in made:
            plumbing.remove_netns(name)
        os.close(prog)


if __name__ == "__main__":
    main()
