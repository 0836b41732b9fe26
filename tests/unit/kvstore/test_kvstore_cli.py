"""`pylium kvstore get|list|watch` through the agent API routes, against a real embedded
store served on a temp unix socket (the test writes through a second store on the same
SQLite file, as another process would)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from pylium.agent import routes_kvstore
from pylium.agent.server import errors_as_json
from pylium.kvstore.conformance import run
from pylium.kvstore.embedded import EmbeddedKVStore

PYLIUM = str(Path(sys.executable).with_name("pylium"))
FAST = {"poll_interval": 0.02, "sweep_interval": 0.1}


class ApiServer:
    """routes_kvstore on a unix socket, in its own thread and event loop."""

    def __init__(self, state: Path, sock: Path):
        self.state, self.sock = state, sock
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _start(self):
        self.store = EmbeddedKVStore(FAST, self.state)
        await self.store.open()
        app = web.Application(middlewares=[errors_as_json])
        routes_kvstore.setup(app, SimpleNamespace(kvstore=self.store))
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.sock)).start()

    async def _stop(self):
        await self.runner.cleanup()
        await self.store.close()

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def api():
    workdir = Path(tempfile.mkdtemp(prefix="pyl-kv-"))  # short: unix socket path limit
    try:
        with ApiServer(workdir / "state", workdir / "api.sock") as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def write(state: Path, *ops):
    async def body():
        async with EmbeddedKVStore(FAST, state) as kv:
            for op, key, value in ops:
                if op == "put":
                    await kv.put(key, value)
                else:
                    await kv.delete(key)
            return await kv.revision()
    return run(body())


def pylium(api, *args, timeout=30):
    return subprocess.run([PYLIUM, "-H", str(api.sock), "kvstore", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_get_and_list_decode_values(api):
    write(api.state, ("put", "pylium/nodes/b", b'{"ip": "10.0.0.2"}'),
          ("put", "pylium/nodes/a", b"plain text"), ("put", "pylium/other", b"\xff\x00"))
    out = pylium(api, "get", "pylium/nodes/b")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ip": "10.0.0.2"}
    out = pylium(api, "get", "pylium/nodes/a", "-o", "json")
    item = json.loads(out.stdout)
    assert (item["value"], item["encoding"]) == ("plain text", "utf-8")
    out = pylium(api, "list", "pylium/", "-o", "json")
    data = json.loads(out.stdout)
    assert [i["key"] for i in data["items"]] == ["pylium/nodes/a", "pylium/nodes/b",
                                                 "pylium/other"]
    assert data["items"][2]["encoding"] == "base64"
    assert data["revision"] >= max(i["mod_revision"] for i in data["items"])
    table = pylium(api, "list", "pylium/nodes/").stdout
    assert "pylium/nodes/a" in table and "10.0.0.2" in table and "pylium/other" not in table


def test_get_missing_key_is_one_error_line(api):
    out = pylium(api, "get", "nope")
    assert out.returncode == 1
    assert out.stderr.strip() == "Error: key 'nope' not found"


def test_watch_streams_changes_as_they_happen(api):
    start = write(api.state, ("put", "w/seed", b"0"))
    proc = subprocess.Popen([PYLIUM, "-H", str(api.sock), "kvstore", "watch", "w/",
                             "--after-revision", str(start), "--count", "3", "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        write(api.state, ("put", "w/a", b'{"n": 1}'), ("put", "x/ignored", b"1"))
        # the first change is printed while the command keeps running...
        first = json.loads(proc.stdout.readline())
        assert proc.poll() is None
        # ...and later changes follow
        write(api.state, ("delete", "w/seed", b""), ("put", "w/b", b"two"))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    events = [first] + [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["key"], e["value"]) for e in events] == [
        ("put", "w/a", {"n": 1}), ("delete", "w/seed", None), ("put", "w/b", "two")]
    assert all(e["revision"] > start for e in events)


def test_watch_replays_after_a_revision_as_text(api):
    start = write(api.state, ("put", "r/0", b"zero"))
    write(api.state, ("put", "r/1", b"one"), ("delete", "r/0", b""))
    out = pylium(api, "watch", "r/", "--after-revision", str(start), "--count", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("PUT r/1 = one (rev ")
    assert lines[1].startswith("DELETE r/0 (rev ")


def test_bad_query_is_a_user_error(api):
    out = subprocess.run(
        [sys.executable, "-c",
         "from pylium.agent.client import AgentClient; import sys;"
         f"AgentClient({str(api.sock)!r}).get('/v1/kvstore/watch?after_revision=x')"],
        capture_output=True, text=True, timeout=30)
    assert "after_revision" in out.stderr and "integer" in out.stderr
