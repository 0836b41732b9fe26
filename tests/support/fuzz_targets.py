"""Fuzz targets for every input path that reads bytes someone else wrote, shared by the
hypothesis tests (tests/unit/fuzz, a bounded number per `make test`), the mutation fuzzer in
`bench/bench_fuzz.py` (the big count) and atheris when it is installed.

Each target takes bytes and returns normally or raises the error its input path promises
(a `UserError`/`RecordError` whose message is one line). Anything else — another exception,
a multi-line message, a RecursionError — is a finding: `check()` raises `Finding`, and the
fuzzers save the input under tests/fuzz_corpus/<target>/ so it is replayed forever after."""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

from pylium import config
from pylium.cluster.ipcache import IP_PREFIX, decode_entry
from pylium.cluster.nodes import decode_node
from pylium.documents import RecordError
from pylium.errors import UserError
from pylium.flow.decode import EVENT_SIZE, Decoder
from pylium.flow.model import compact_line, to_hubble, to_response
from pylium.identity.allocator import ID_PREFIX, decode_identity
from pylium.policy.load import load_text
from pylium.policy.repository import decode_record

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz_corpus"
SEEDS = REPO / "examples" / "policies"


class Finding(AssertionError):
    """An input broke its path's contract (crash, traceback-worthy error, bad message)."""


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    if not text.strip() or "\n" in text or "Traceback" in text:
        raise Finding(f"{type(exc).__name__} message is not one clear line: {text[:300]!r}")


def policy_bytes(data: bytes) -> None:
    """`pylium policy validate FILE` / `import`: bytes of a policy file."""
    try:
        policies = load_text(data, "fuzz")
    except UserError as exc:
        for line in getattr(exc, "errors", [str(exc)]):
            _one_line(Exception(line))
        return
    for p in policies:  # what the store persists must serialize
        json.dumps(p.source)


_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="pylium-fuzz-reliability-"))


def config_bytes(data: bytes) -> None:
    """The agent's config file (`--config`), read and validated as `pylium agent` does."""
    path = _CONFIG_DIR / f"config-{os.getpid()}.yaml"
    path.write_bytes(data)
    try:
        config.load(path, environ={})
    except UserError as exc:
        _one_line(exc)


def _record(decode: Callable[[bytes], object]) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        try:
            decode(data)
        except RecordError as exc:
            _one_line(exc)
    return target


identity_record = _record(lambda raw: decode_identity(ID_PREFIX + "4242", raw))
node_record = _record(decode_node)
ipcache_record = _record(lambda raw: decode_entry(IP_PREFIX + "10.0.0.1", raw))
policy_record = _record(lambda raw: decode_record("pylium/state/policies/v1/x", raw))


def identity_key(data: bytes) -> None:
    """The number part of an identity key, as a watch event carries it."""
    key = ID_PREFIX + data.decode("utf-8", "replace")
    try:
        decode_identity(key, b'["k8s:app=x"]')
    except RecordError as exc:
        _one_line(exc)


_DECODER = Decoder(node_name="fuzz")


def flow_events(data: bytes) -> None:
    """Ring-buffer bytes (whole 64-byte events) → flows → Hubble JSON and the compact line."""
    data = data[: len(data) - len(data) % EVENT_SIZE]
    for flow in _DECODER.decode(data, 0):
        response = to_response(flow)
        json.dumps(to_hubble(flow))
        compact_line(response)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "policy": policy_bytes,
    "config": config_bytes,
    "identity_record": identity_record,
    "identity_key": identity_key,
    "node_record": node_record,
    "ipcache_record": ipcache_record,
    "policy_record": policy_record,
    "flow_events": flow_events,
}


def check(name: str, data: bytes) -> None:
    """Run one input; any exception the target lets through becomes a `Finding`."""
    try:
        TARGETS[name](data)
    except Finding:
        raise
    except BaseException as exc:  # noqa: BLE001 - a fuzzer must see everything
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise Finding(f"{name}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def save_finding(name: str, data: bytes) -> Path:
    """Keep a finding in the regression corpus (named by its content, so saved once)."""
    import hashlib

    folder = CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"found-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def corpus(name: str) -> list[tuple[str, bytes]]:
    """The regression inputs of one target: (file name, bytes)."""
    folder = CORPUS / name
    if not folder.is_dir():
        return []
    return [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]


# seeds and mutation (the bench's fuzzer; atheris brings its own) -----------------------------

def _valid_event() -> bytes:
    from pylium.flow.decode import encode_event

    return encode_event(type=4, reason=1, direction=1, ep_id=7, src_identity=300,
                        dst_identity=2, saddr="10.200.0.5", daddr="1.1.1.1", sport=40000,
                        dport=80, protocol=6, tcp_flags=2, pkt_len=60)


def seeds(name: str) -> list[bytes]:
    """Well-formed inputs to mutate from, plus the regression corpus."""
    out: list[bytes] = [data for _, data in corpus(name)]
    if name == "policy":
        out += [p.read_bytes() for p in sorted(SEEDS.glob("*.yaml"))]
        out += [b'[{"endpointSelector": {}, "ingress": [{"fromEndpoints": [{}]}]}]']
    elif name == "config":
        out += [b"node_name: n1\nkvstore: embedded\npod_cidr: 10.200.0.0/24\n"
                b"plugin_options: {vxlan: {port: 8472}}\nl7_parsers: [http]\n"]
    elif name in ("identity_record",):
        out += [b'["k8s:app=web","k8s:io.kubernetes.pod.namespace=default"]']
    elif name == "identity_key":
        out += [b"4242", b"256", b"65535"]
    elif name == "node_record":
        out += [b'{"name": "n2", "ipv4": "192.168.1.2", "pod_cidr": "10.201.0.0/24", '
                b'"labels": {"zone": "a"}, "encryption_key": "", "registered_at": 1.5}']
    elif name == "ipcache_record":
        out += [b'{"ip": "10.0.0.1", "identity": 300, "node": "n2", "node_ip": "192.168.1.2",'
                b' "endpoint": "default/web"}']
    elif name == "policy_record":
        rule = (SEEDS / "l3-l4-rule1.yaml").read_bytes() if SEEDS.is_dir() else b""
        docs = load_text(rule, "rule1") if rule else []
        out += [json.dumps({"kind": p.kind, "name": p.name, "namespace": p.namespace,
                            "source": p.source}).encode() for p in docs]
    elif name == "flow_events":
        out += [_valid_event() * 3]
    return out or [b""]


_TOKENS = [b"[", b"]", b"{", b"}", b"&a ", b"*a", b"<<: *a\n", b"- ", b": ", b"\n  ", b"'",
           b'"', b"\\", b"\xff", b"\x00", b"\xef\xbb\xbf", "\ufeff".encode(),
           b"!!binary ", b"!!set ", b"!!timestamp ", b"!!python/object ", b"9" * 5000,
           b"1e999", b"NaN", b"{{ .Values }}", b"---\n", b"...\n", b"%YAML 1.1\n", b"?",
           b"\t", b"\r", b"~", b"null", b"true", b"-1", b"0x", b"4294967296", b"\xc0\x80",
           b"\xed\xa0\x80", "\U0001f600".encode()]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to four random edits: flip, insert a token or random bytes, delete, duplicate,
    splice another seed, nest, or re-encode as UTF-16/32."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(_TOKENS)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 3 and buf:
            end = min(len(buf), pos + rng.randint(1, 64))
            del buf[pos:end]
        elif op == 4 and buf:
            end = min(len(buf), pos + rng.randint(1, 256))
            buf[pos:pos] = buf[pos:end] * rng.randint(1, 8)
        elif op == 5:
            other = rng.choice(pool)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 6:
            depth = rng.choice((2, 10, 63, 64, 65, 200, 5000))
            opener, closer = rng.choice(((b"[", b"]"), (b"{a: ", b"}"), (b'{"a":', b"}")))
            buf = bytearray(opener * depth) + buf + bytearray(closer * depth)
        elif op == 7:
            try:
                text = bytes(buf).decode("utf-8")
            except UnicodeDecodeError:
                continue
            buf = bytearray(text.encode(rng.choice(("utf-16", "utf-32", "utf-16-be"))))
        elif op == 8:
            buf[pos:pos] = (b"a: &x [" + b"*x," * rng.randint(1, 30) + b"]\n") * 2
        else:
            if buf:
                i = rng.randrange(len(buf))
                buf[i] = rng.choice(b" -:[]{}&*!|>'\"#%@`,?\n\x00\xff")
    if len(buf) > 256 * 1024:
        del buf[256 * 1024:]
    return bytes(buf)


# the agent API ---------------------------------------------------------------------------

class ApiFuzzer:
    """Requests against the real aiohttp app of an agent with its embedded KV store and the
    identity and policy components (no datapath: routes that need one answer 503, which is
    a clear refusal). Every answer must be a JSON object with one-line `error` for 4xx/5xx,
    and never a 500."""

    METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
    TIMEOUT_S = 10.0
    #: routes that stream until the client leaves
    STREAMING = ("/v1/kvstore/watch",)

    def __init__(self, client, routes: list[tuple[str, str]]):
        self.client = client
        self.routes = routes
        self.requests = 0

    @classmethod
    def route_table(cls, app) -> list[tuple[str, str]]:
        """(method, path with `{x}` placeholders) of every registered route."""
        out = []
        for route in app.router.routes():
            info = route.resource.get_info() if route.resource else {}
            path = info.get("path") or info.get("formatter")
            if path and route.method != "HEAD":
                out.append((route.method, path))
        return sorted(set(out))

    async def send(self, method: str, path: str, body: bytes,
                   content_type: str = "application/json") -> tuple[int, object]:
        self.requests += 1
        try:
            async with asyncio.timeout(self.TIMEOUT_S):
                resp = await self.client.request(method, path, data=body,
                                                 headers={"Content-Type": content_type})
                raw = await resp.read()
        except TimeoutError:
            if path.split("?")[0] in self.STREAMING:
                return 200, None  # a watch that lasts is what was asked for
            raise Finding(f"{method} {path}: no answer in {self.TIMEOUT_S} s "
                          f"(body {body[:100]!r})") from None
        if resp.status >= 500 and resp.status != 503:
            raise Finding(f"{method} {path}: HTTP {resp.status}: {raw[:300]!r}")
        if resp.status >= 400:
            try:
                answer = json.loads(raw)
            except ValueError:
                if resp.status in (405, 413, 404):  # aiohttp's own refusals (plain text)
                    return resp.status, raw
                raise Finding(f"{method} {path}: HTTP {resp.status} not JSON: {raw[:200]!r}"
                              ) from None
            error = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(error, str) or "\n" in error or not error.strip():
                raise Finding(f"{method} {path}: HTTP {resp.status} error is not one line: "
                              f"{raw[:300]!r}")
            return resp.status, answer
        return resp.status, None

    def fill(self, rng: random.Random, path: str) -> str:
        """A concrete path: placeholders filled with hostile segments, a random query."""
        import re
        from urllib.parse import quote

        def segment(_m) -> str:
            return quote(rng.choice(["1", "0", "-1", "99999999999999999999", "default/x",
                                     "%00", "..", "a" * 300, "\u202e", "x\ny",
                                     rng.randbytes(4).hex()]), safe="")
        out = re.sub(r"\{[^}]+\}", segment, path)
        if rng.random() < 0.5:
            # (not `follow`: following a flow stream is meant to last)
            key = rng.choice(["name", "namespace", "labels", "all", "source",
                              "last", "since", "dry_run", "number", "verdict", "x"])
            out += "?" + key + "=" + quote(rng.choice(["true", "1", "", "-5", "a,b=c",
                                                       "\u0000", "9" * 40, "x=y"]), safe="")
        return out


def api_bodies(rng: random.Random, pool: list[bytes]) -> bytes:
    """A request body: JSON of the wrong shape, nested deep, not JSON, or a mutation."""
    choice = rng.randrange(7)
    if choice == 0:
        return json.dumps(rng.choice([[], "text", 5, None, True, {"text": 5},
                                      {"text": ["a"]}, {"labels": "x"}, {"labels": {"a": 1}},
                                      {"netns": 7}, {"netns": "/etc/passwd"},
                                      {"dport": "x"}, {"dport": -1}, {"src": {}},
                                      {"datapath": "yes", "dport": 80}])).encode()
    if choice == 1:
        depth = rng.choice((64, 65, 1000, 100_000))
        return b'{"text":' + b"[" * depth + b"]" * depth + b"}"
    if choice == 2:
        return rng.randbytes(rng.randint(0, 64))
    if choice == 3:
        policy = rng.choice(pool).decode("utf-8", "replace")
        return json.dumps({"text": policy, "name": rng.choice(["x", "", 5, None])}).encode()
    return mutate(rng, rng.choice(pool), pool)
