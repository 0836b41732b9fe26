"""Hostile inputs, counted: every fuzz target of tests/support/fuzz_targets.py (policy files,
the config file, KV-store records, datapath events) and the agent API (every route, with an
embedded KV store and the policy engine) fed mutated inputs for a time slice each, plus a
coverage-guided atheris run per byte target when atheris is installed.

Prints one line per target and a JSON result line: inputs tried, findings (crashes,
tracebacks, multi-line errors, answers slower than `SLOW_S`), must be 0. A finding is saved
under tests/fuzz_corpus/<target>/ and replayed by `make test` from then on.

    .venv/bin/python bench/bench_fuzz.py [SECONDS_PER_TARGET]   (default 20; CI uses 2)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from common import report  # noqa: E402

from tests.support import fuzz_targets as ft  # noqa: E402

SLOW_S = 2.0


def run_target(name: str, seconds: float, seed: int) -> tuple[int, int, float]:
    """(inputs, findings, slowest s) of `name` for `seconds` of mutation fuzzing."""
    rng = random.Random(seed)
    pool = ft.seeds(name)
    inputs = findings = 0
    slowest = 0.0
    end = time.monotonic() + seconds
    batch = list(pool)
    while time.monotonic() < end or batch:
        data = batch.pop() if batch else ft.mutate(rng, rng.choice(pool), pool)
        started = time.monotonic()
        try:
            ft.check(name, data)
            took = time.monotonic() - started
            if took > SLOW_S:
                raise ft.Finding(f"{name}: {took:.1f} s for one input")
        except ft.Finding as exc:
            findings += 1
            print(f"  finding: {exc} -> {ft.save_finding(name, data)}", flush=True)
        slowest = max(slowest, time.monotonic() - started)
        inputs += 1
        if rng.random() < 0.001 and len(pool) < 500:
            pool.append(data)  # keep a few survivors: mutations of mutations go deeper
    return inputs, findings, slowest


async def _run_api(seconds: float, seed: int) -> tuple[int, int, float]:
    from aiohttp.test_utils import TestClient, TestServer
    from pylium.agent.server import make_app

    from tests.unit.policy.conftest import _start_daemon

    rng = random.Random(seed)
    pool = ft.seeds("policy")
    findings = 0
    slowest = 0.0
    with tempfile.TemporaryDirectory(prefix="pylium-fuzz-api-reliability-") as state:
        daemon = await _start_daemon(Path(state))
        app = make_app(daemon)
        routes = [r for r in ft.ApiFuzzer.route_table(app) if r[1] not in ft.ApiFuzzer.STREAMING]
        async with TestClient(TestServer(app)) as client:
            fuzz = ft.ApiFuzzer(client, routes)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                method, path = rng.choice(routes)
                if rng.random() < 0.2:
                    method = rng.choice(ft.ApiFuzzer.METHODS)
                body = ft.api_bodies(rng, pool)
                target = fuzz.fill(rng, path)
                started = time.monotonic()
                try:
                    await fuzz.send(method, target, body)
                except ft.Finding as exc:
                    findings += 1
                    saved = ft.save_finding("api", json.dumps(
                        {"method": method, "path": target,
                         "body": body.decode("latin-1")}).encode())
                    print(f"  finding: {exc} -> {saved}", flush=True)
                slowest = max(slowest, time.monotonic() - started)
        await daemon.stop()
    return fuzz.requests, findings, slowest


ATHERIS_CHILD = """
import sys
sys.path[:0] = [{repo!r}]
import atheris
with atheris.instrument_imports(include=["pylium"]):
    from tests.support import fuzz_targets as ft
def one(data):
    try:
        ft.check({name!r}, data)
    except ft.Finding as exc:
        print("finding:", exc, flush=True)
        raise
atheris.Setup([sys.argv[0], "-max_total_time={seconds}", "-timeout=10",
               "-rss_limit_mb=2048", "-artifact_prefix={prefix}", "-print_final_stats=1",
               {corpus!r}], one)
atheris.Fuzz()
"""


def run_atheris(name: str, seconds: int) -> tuple[int, int] | None:
    """(inputs, findings) of a coverage-guided run in a child (libFuzzer ends the process);
    None when atheris is not installed."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        return None
    prefix = ft.CORPUS / name
    prefix.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pylium-atheris-reliability-") as work:
        for i, seed in enumerate(ft.seeds(name)):
            Path(work, f"seed-{i}").write_bytes(seed)
        code = ATHERIS_CHILD.format(repo=str(REPO), name=name, seconds=seconds,
                                    prefix=f"{prefix}/atheris-", corpus=work)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=REPO, timeout=seconds + 120)
    out = proc.stdout + proc.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    inputs = int(runs[-1]) if runs else 0
    found = 0 if proc.returncode == 0 else 1
    if found:
        print("  atheris:", "\n  ".join(out.strip().splitlines()[-15:]), flush=True)
    return inputs, found


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else float(os.environ.get("PYLIUM_FUZZ_SECONDS", 20))
    seed = int(os.environ.get("PYLIUM_FUZZ_SEED", time.time()))
    rows = []
    for name in ft.TARGETS:
        inputs, findings, slowest = run_target(name, seconds, seed)
        rows.append((name, "mutation", inputs, findings, slowest))
        print(f"{name:<16} mutation {inputs:>9} inputs {findings} findings "
              f"(slowest {slowest * 1000:.0f} ms)", flush=True)
    inputs, findings, slowest = asyncio.run(_run_api(seconds, seed))
    rows.append(("api", "mutation", inputs, findings, slowest))
    print(f"{'api':<16} mutation {inputs:>9} requests {findings} findings "
          f"(slowest {slowest * 1000:.0f} ms)", flush=True)
    for name in ("policy", "config", "node_record", "policy_record"):
        got = run_atheris(name, max(1, int(seconds)))
        if got is None:
            print("atheris not installed: coverage-guided runs skipped", flush=True)
            break
        rows.append((name, "atheris", got[0], got[1], 0.0))
        print(f"{name:<16} atheris  {got[0]:>9} inputs {got[1]} findings", flush=True)
    total = sum(r[2] for r in rows)
    found = sum(r[3] for r in rows)
    print(f"total: {total} inputs, {found} findings (seed {seed})", flush=True)
    report("fuzz", "hostile inputs tried (findings must be 0)", "inputs", total, 1_000_000,
           "issue 15 goal", "inputs >= baseline with 0 findings",
           met=total >= 1_000_000 and found == 0, findings=found,
           seconds_per_target=seconds, seed=seed,
           targets={f"{r[0]}/{r[1]}": {"inputs": r[2], "findings": r[3]} for r in rows})
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
