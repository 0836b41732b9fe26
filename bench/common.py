"""Shared by every benchmark: the result line `bench/run.py` collects, and interleaved rounds.

A result line is one JSON object: `bench`, `metric`, `unit`, `pylium`, `baseline`,
`baseline_name` (a real alternative a user could pick, or the goal itself when nothing
honest can be raced here; the line says which), `ratio` = pylium / baseline, `goal` (what
better means) and `met` (whether the goal was reached), plus whatever else explains it."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


def report(bench: str, metric: str, unit: str, pylium: float, baseline: float,
           baseline_name: str, goal: str, met: bool | None = None, **extra) -> dict:
    """Print the result line: `ratio` is pylium / baseline (what "better" means is in `goal`),
    `met` whether the goal was reached."""
    line = {
        "bench": bench, "metric": metric, "unit": unit,
        "pylium": round(pylium, 6), "baseline": round(baseline, 6),
        "baseline_name": baseline_name,
        "ratio": round(pylium / baseline, 4) if baseline else None,
        "goal": goal, "met": None if met is None else bool(met),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
    }
    print(json.dumps(line), flush=True)
    sys.stdout.flush()
    return line


def interleave(pylium: Callable[[], float], baseline: Callable[[], float],
               rounds: int = 5) -> tuple[list[float], list[float]]:
    """Run the two sides alternately `rounds` times each (baseline first, then pylium, so
    drift on a shared machine hits both alike); returns each side's samples in order."""
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(baseline())
        ours.append(pylium())
    return ours, theirs


def spread(samples: list[float]) -> dict[str, float]:
    """Median, min, max and the relative spread (max - min) / median of one side's rounds."""
    mid = statistics.median(samples)
    return {"median": round(mid, 6), "min": round(min(samples), 6),
            "max": round(max(samples), 6),
            "rel_spread": round((max(samples) - min(samples)) / mid, 4) if mid else None,
            "runs": [round(s, 6) for s in samples]}


def report_rounds(bench: str, metric: str, unit: str, ours: list[float], theirs: list[float],
                  baseline_name: str, goal: str, met: Callable[[float, float], bool],
                  **extra) -> dict:
    """A result line from interleaved rounds: medians compared, both spreads attached;
    `met(pylium_median, baseline_median)` decides the goal."""
    a, b = statistics.median(ours), statistics.median(theirs)
    return report(bench, metric, unit, a, b, baseline_name, goal, met=met(a, b),
                  rounds=len(ours), pylium_spread=spread(ours), baseline_spread=spread(theirs),
                  **extra)


def iperf(server_ns: str, client_ns: str, server_ip: str, seconds: int = 3) -> float:
    """Gbit/s of one iperf3 TCP run from netns `client_ns` to a one-shot server in
    `server_ns` (both named netns under /run/netns)."""
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{server_ns}", "--", "iperf3", "-s",
                               "-1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.4)
        out = subprocess.run(["nsenter", f"--net=/run/netns/{client_ns}", "--", "iperf3", "-c",
                              server_ip, "-t", str(seconds), "-J"], capture_output=True,
                             text=True, timeout=seconds + 30, check=True).stdout
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def two_pods(lab_name: str, routing: str, settings: dict | None = None):
    """A two-node lab (`routing` mode, agent `settings`) with pod a on node1 and pod b on
    node2 that reach each other: (lab, a, b). The lab is taken down if it does not get there;
    otherwise the caller takes it down."""
    from pylium.lab.lab import Lab

    lab = Lab(lab_name)
    try:
        lab.up(nodes=2, routing=routing, agent_settings=settings)
        a = lab.add_pod("a", {"app": "a"}, node="node1")
        b = lab.add_pod("b", {"app": "b"}, node="node2")
        deadline = time.monotonic() + 30
        while lab.exec("a", ["ping", "-c", "1", "-W", "1", b["ip"]]).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"{lab_name} ({routing}): pods do not reach each other")
    except BaseException:
        lab.down()
        raise
    return lab, a, b
