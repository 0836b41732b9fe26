"""Hostile input through every path that reads someone else's bytes: policy files, the
config file, the agent API, KV-store records, datapath events. Known crashes first (each
was a traceback or a 500), then the regression corpus (tests/fuzz_corpus/, what the fuzzers
found), then a bounded hypothesis run per target; the big count is `make bench
B=fuzz` (bench/bench_fuzz.py)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pylium.agent.server import make_app
from pylium.cli.main import cli
from pylium.documents import MAX_BYTES, MAX_DEPTH

from tests.support import fuzz_targets as ft
from tests.unit.policy.conftest import _start_daemon

#: 9 lines, 9^9 = 387 million "lol"s once expanded
BILLION_LAUGHS = ("a: &a [" + ", ".join(["lol"] * 9) + "]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi",
                                                                strict=True))).encode()

HOSTILE_FILES = {
    "not-utf8.yaml": (b"kind: \xff\xfe\xfa\n", "not UTF-8 text (byte 0xff at offset 6)"),
    "deep.yaml": (b"a:\n" + b"".join(b" " * (i + 1) + b"-\n" for i in range(3000)),
                  f"nested deeper than {MAX_DEPTH} levels"),
    "deep.json": (b"[" * 5000 + b"]" * 5000, f"nested deeper than {MAX_DEPTH} levels"),
    "laughs.yaml": (BILLION_LAUGHS, "aliases expand to more than"),
    "recursive.yaml": (b"a: &x\n  b: *x\n", "an alias refers to a node that contains it"),
    "control.yaml": (b"kind: x\x07\n", "not valid YAML or JSON"),
    "bigint.yaml": (b"a: " + b"9" * 5000 + b"\n", "cannot read a value"),
    "newline-key.yaml": (b'{"ki\\nd": 1}', "ki\\nd: unknown field"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_FILES))
def test_policy_validate_refuses_hostile_files_with_one_line(tmp_path, name):
    data, expected = HOSTILE_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    result = CliRunner().invoke(cli, ["policy", "validate", str(path)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: "), result.output
    assert expected in lines[0] and "Traceback" not in result.output


def test_utf16_and_bom_files_are_read(tmp_path, example_policies):
    text = (example_policies / "l3-l4-rule1.yaml").read_text()
    for encoding in ("utf-16", "utf-32", "utf-8-sig"):
        path = tmp_path / f"rule1-{encoding}.yaml"
        path.write_bytes(text.encode(encoding))
        result = CliRunner().invoke(cli, ["policy", "validate", str(path)])
        assert result.exit_code == 0 and "valid (1 policies" in result.output, result.output


@pytest.mark.parametrize("target", sorted(ft.TARGETS))
def test_regression_corpus(target):
    """Every input a fuzzer ever found keeps being refused cleanly (or accepted)."""
    for name, data in ft.corpus(target):
        started = time.monotonic()
        try:
            ft.check(target, data)
        except ft.Finding as exc:
            raise AssertionError(f"tests/fuzz_corpus/{target}/{name}: {exc}") from None
        took = time.monotonic() - started
        assert took < 2.0, f"tests/fuzz_corpus/{target}/{name}: {took:.1f} s (a hang)"


def _json_values():
    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | \
        st.text(max_size=20)
    return st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) |
                        st.dictionaries(st.text(max_size=12), kids, max_size=4), max_leaves=30)


def _documents():
    """Bytes of documents: random binary, random JSON/YAML values in random encodings, and
    policy-shaped documents with random parts."""
    shaped = st.fixed_dictionaries({
        "apiVersion": st.sampled_from(["cilium.io/v2", "networking.k8s.io/v1", 5]),
        "kind": st.sampled_from(["CiliumNetworkPolicy", "NetworkPolicy",
                                 "CiliumClusterwideNetworkPolicy", "Pod"]),
        "metadata": st.fixed_dictionaries({"name": st.text(max_size=8) | st.integers()}),
        "spec": _json_values()})
    values = (_json_values() | shaped)
    encoded = st.tuples(values, st.sampled_from(["json", "yaml"]),
                        st.sampled_from(["utf-8", "utf-16", "utf-32", "utf-8-sig"])).map(
        lambda t: (json.dumps(t[0]) if t[1] == "json" else _yaml_dump(t[0])).encode(t[2]))
    return st.binary(max_size=300) | encoded


def _yaml_dump(value) -> str:
    import yaml

    return yaml.safe_dump(value, allow_unicode=True)


@pytest.mark.parametrize("target", sorted(ft.TARGETS))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_documents(), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_inputs_never_crash(target, data, seed):
    ft.check(target, data)
    rng = random.Random(seed)  # and one mutation of a well-formed seed
    pool = ft.seeds(target)
    ft.check(target, ft.mutate(rng, rng.choice(pool), pool))


# the agent API ---------------------------------------------------------------------------

def test_api_refuses_hostile_bodies_with_400_and_never_500(tmp_path, example_policies):
    pool = ft.seeds("policy")

    async def go():
        daemon = await _start_daemon(tmp_path)
        app = make_app(daemon)
        routes = ft.ApiFuzzer.route_table(app)
        assert ("POST", "/v1/policy") in routes and len(routes) >= 15, routes
        async with TestClient(TestServer(app)) as client:
            fuzz = ft.ApiFuzzer(client, routes)
            deep = b'{"text": "x", "name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            status, answer = await fuzz.send("POST", "/v1/policy", deep)
            assert status == 400 and "nested deeper" in answer["error"], answer
            status, answer = await fuzz.send("POST", "/v1/policy", b"\xff\xfe{")
            assert status == 400 and "not UTF-16 text" in answer["error"] or \
                "not valid JSON" in answer["error"], answer
            status, _ = await fuzz.send("POST", "/v1/policy", b"x" * (MAX_BYTES + 1))
            assert status == 413
            status, answer = await fuzz.send("POST", "/v1/policy",
                                             json.dumps({"text": BILLION_LAUGHS.decode()}
                                                        ).encode())
            assert status == 400 and "aliases expand" in answer["error"], answer
            rng = random.Random(15)
            for _ in range(400):
                method, path = rng.choice(routes)
                if path in ft.ApiFuzzer.STREAMING:
                    continue  # lasts until the client leaves (10 s each here)
                if rng.random() < 0.2:
                    method = rng.choice(ft.ApiFuzzer.METHODS)
                await fuzz.send(method, fuzz.fill(rng, path), ft.api_bodies(rng, pool))
            # still serving, nothing half-imported from the hostile bodies
            status, _ = await fuzz.send("GET", "/v1/policy", b"")
            assert status == 200
        await daemon.stop()

    asyncio.run(go())
