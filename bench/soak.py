"""`make soak`: the reliability parts of issue 15 that exist so far, run together for a
bounded time (default 600 s; `make soak SOAK_SECONDS=60` for a short run), one table at the
end. Rows: hostile inputs (bench_fuzz.py: every parser, KV record decoder, the flow decoder,
the agent API, atheris when installed), random packets through every BPF program
(test_fuzz_packets.py), full maps and hostile API requests on a real agent (fail closed).
KV-store outage (etcd stopped 60 s, then restarted with a wiped data dir, under probes) and
endpoint churn (200 endpoints, 20 at a time, with policy churn) run as their privileged
tests at soak size (`kv_outage_and_churn_rows`). Restart under load and BPF upgrade are not
built yet: their rows say so rather than pass."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
NOT_BUILT = ("restart under load (20 restarts, iperf3/wrk)", "BPF object upgrade under traffic")


def _pytest(paths: list[str], env: dict[str, str], timeout: float) -> tuple[bool, str]:
    proc = subprocess.run([PY, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *paths],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode == 0, proc.stdout + proc.stderr


def main(argv: list[str]) -> int:
    budget = float(argv[0]) if argv else float(os.environ.get("SOAK_SECONDS", 600))
    started = time.monotonic()
    rows: list[tuple[str, str, str, str, str]] = []
    failed = False

    per_target = max(1.0, budget * 0.6 / 14)  # 9 byte targets + API + 4 atheris runs
    proc = subprocess.run([PY, str(REPO / "bench" / "bench_fuzz.py"), str(per_target)],
                          cwd=REPO, capture_output=True, text=True, timeout=budget * 3 + 300)
    result = next((json.loads(line) for line in proc.stdout.splitlines()
                   if line.startswith("{") and '"bench"' in line), None)
    if result is None:
        failed = True
        rows.append(("hostile inputs", "-", "ERROR", "-", "-"))
        print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
    else:
        failed |= result["findings"] != 0
        rows.append(("hostile inputs (parsers, records, API)", "-",
                     f"{result['pylium']} ({result['findings']} findings)", "-", "-"))

    left = max(30.0, budget - (time.monotonic() - started))
    packets = max(300, int(left * 0.5 * 800))  # ~800 test runs a second per program
    ok, out = _pytest(["tests/privileged/datapath/test_fuzz_packets.py"],
                      {"PYLIUM_FUZZ_PACKETS": str(packets)}, timeout=left * 4 + 300)
    found = re.search(r"(\d+) random packets through (\d+) programs", out)
    failed |= not ok
    rows.append(("random packets, every BPF program", "-",
                 f"{found.group(1) if found else '?'} ({'ok' if ok else 'FAILED'})", "-", "-"))

    ok, out = _pytest(["tests/privileged/datapath/test_map_full.py",
                       "tests/privileged/endpoint/test_hostile_api.py",
                       "tests/privileged/endpoint/test_policy_capacity.py"], {}, timeout=900)
    failed |= not ok
    rows.append(("real agent + datapath", "full policy map, full ipcache, hostile API bodies",
                 "-", "-", "0 (last good policy kept)" if ok else "FAILED"))
    kv_rows, kv_failed = kv_outage_and_churn_rows(budget)
    rows += kv_rows
    failed |= kv_failed
    for name in NOT_BUILT:
        rows.append((name, "not built yet", "-", "-", "-"))

    header = ("part", "faults injected", "inputs tried", "connections broken", "data lost")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(f"soak: {time.monotonic() - started:.0f} s, {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


def kv_outage_and_churn_rows(budget: float) -> tuple[list[tuple[str, ...]], bool]:
    """Issue 15 items 3 and 4 at soak size: the KV outage lasts 60 s (the CI test: 10 s),
    churn creates 200 endpoints 20 at a time (CI: 60, 10 at a time). Returns the table
    rows and whether any failed. `budget` is not stretched: these runs have fixed sizes."""
    rows: list[tuple[str, ...]] = []
    failed = False
    ok, out = _pytest(["tests/privileged/cluster/test_kv_outage.py"],
                      {"PYLIUM_KV_OUTAGE_S": "60"}, timeout=1200)
    failed |= not ok
    probes = [tuple(map(int, m)) for m in re.findall(
        r"(\d+) probe rounds, (\d+) allowed refused, (\d+) denied passed", out)]
    rounds = sum(p[0] for p in probes)
    refused = sum(p[1] for p in probes)
    passed = sum(p[2] for p in probes)
    rows.append(("KV-store outage 60 s + wiped etcd (2 agents)",
                 "etcd stopped 60 s; etcd wiped",
                 f"{rounds} probe rounds x 6 flows",
                 f"{refused} allowed refused, {passed} denied passed" if probes else "?",
                 "0 (identities, nodes, endpoints, services rebuilt)" if ok else "FAILED"))
    if not ok:
        print(out[-3000:], file=sys.stderr)
    ok, out = _pytest(["tests/privileged/endpoint/test_churn.py"],
                      {"PYLIUM_CHURN_ENDPOINTS": "200", "PYLIUM_CHURN_PARALLEL": "20",
                       "PYLIUM_CHURN_KEEP": "20"}, timeout=1200)
    failed |= not ok
    churn = re.search(r"(\d+) policy imports/deletes", out)
    verdicts = re.search(r"verdicts: (\d+) .* (\d+) differ", out)
    rows.append(("churn: 200 endpoints (20 at a time) + policies",
                 f"{churn.group(1) if churn else '?'} policy imports/deletes",
                 f"{verdicts.group(1) if verdicts else '?'} verdicts vs the evaluator",
                 "-", "0 (no leaked IP, veth, map entry, pin, identity ref)" if ok
                 else "FAILED"))
    if not ok:
        print(out[-3000:], file=sys.stderr)
    return rows, failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
