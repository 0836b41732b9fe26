"""Shared by every benchmark: print one JSON result line the way `bench/run.py` collects."""

from __future__ import annotations

import json
import sys
import time


def report(bench: str, metric: str, unit: str, pylium: float, baseline: float,
           baseline_name: str, goal: str, met: bool | None = None, **extra) -> dict:
    """Print the result line: `ratio` is pylium / baseline (what "better" means is in `goal`),
    `met` whether the goal was reached."""
    line = {
        "bench": bench, "metric": metric, "unit": unit,
        "pylium": round(pylium, 6), "baseline": round(baseline, 6),
        "baseline_name": baseline_name,
        "ratio": round(pylium / baseline, 4) if baseline else None,
        "goal": goal, "met": None if met is None else bool(met), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
    }
    print(json.dumps(line), flush=True)
    sys.stdout.flush()
    return line
