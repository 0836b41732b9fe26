"""Run every benchmark in bench/ (or some: `make bench B=NAME`), print their result lines,
append them to bench/results.jsonl so runs can be compared, and end with one table of every
metric: its ratio, its goal, and whether the goal was met."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value or "")


def table(lines: list[dict]) -> str:
    """Every result line as one row: bench, metric, pylium, baseline, ratio, goal, met."""
    head = ("bench", "metric", "pylium", "baseline", "ratio", "met", "goal")
    rows = [head]
    for item in lines:
        met = item.get("met")
        rows.append((item.get("bench", ""), item.get("metric", ""),
                     f"{_num(item.get('pylium'))} {item.get('unit', '')}".strip(),
                     _num(item.get("baseline")),
                     "" if item.get("ratio") is None else f"{item['ratio']}",
                     {True: "met", False: "NOT MET", None: "?"}[met],
                     item.get("goal", "")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head) - 1)]
    out = []
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + str(r[-1]))
    met = sum(1 for i in lines if i.get("met") is True)
    unknown = sum(1 for i in lines if i.get("met") is None)
    out.append(f"{met} of {len(lines)} goals met"
               + (f"; {unknown} line(s) do not say (`met` missing: the bench must pass met=)"
                  if unknown else ""))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    wanted = [a for a in " ".join(argv).split() if a]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; have: {', '.join(names)}", file=sys.stderr)
        return 2
    if not names:
        print("no benchmarks yet (bench/bench_*.py)", file=sys.stderr)
        return 0
    failed = []
    everything: list[dict] = []
    results = HERE / "results.jsonl"
    for name in wanted or names:
        print(f"== {name}", flush=True)
        proc = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py")],
                              stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        lines = []
        for line in proc.stdout.splitlines():
            print(line, flush=True)
            if line.startswith("{") and '"bench"' in line:
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        if proc.returncode != 0 or not lines:
            print(f"!! benchmark {name} failed (exit {proc.returncode})", file=sys.stderr)
            failed.append(name)
        everything += lines
        with results.open("a") as f:
            for item in lines:
                f.write(json.dumps(item) + "\n")
    print("\n== summary", flush=True)
    print(table(everything), flush=True)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
