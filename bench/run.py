"""Run every benchmark in bench/ (or one: `make bench B=NAME`), print their result lines and
append them to bench/results.jsonl so runs can be compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    wanted = [a for a in argv if a]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; have: {', '.join(names)}", file=sys.stderr)
        return 2
    if not names:
        print("no benchmarks yet (bench/bench_*.py)", file=sys.stderr)
        return 0
    failed = 0
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
            failed += 1
        with results.open("a") as f:
            for item in lines:
                f.write(json.dumps(item) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
