"""The informer's list/watch protocol against a scripted server: resume from the last
resourceVersion, relist on 410 with a diff, bookmarks, errors retried. (The privileged tests
run the same code against the real API server, restarts included.)"""

from __future__ import annotations

import asyncio
import json

from pylium_orchestrator_k8s import informer as informer_mod
from pylium_orchestrator_k8s.informer import Informer


def _obj(name: str, rv: int, ns: str = "default", **labels) -> dict:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                         "labels": labels}}


class _Content:
    def __init__(self, lines: list[dict], block: bool):
        self.data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        self.block = block

    async def iter_any(self):
        # split mid-line: the informer must reassemble lines across chunks
        for i in range(0, len(self.data), 7):
            yield self.data[i:i + 7]
        if self.block:
            await asyncio.Event().wait()


class _Resp:
    def __init__(self, status: int, body: dict | None = None, events=(), block=False):
        self.status = status
        self.body = body
        self.content = _Content(list(events), block)
        self.released = False

    async def read(self) -> bytes:
        return json.dumps(self.body or {}).encode()

    def release(self) -> None:
        self.released = True


class Server:
    """Answers each call with the next scripted response and records the query."""

    def __init__(self, script):
        self.script = list(script)
        self.calls: list[dict] = []

    async def __call__(self, **kw):
        self.calls.append(kw)
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def test_resume_relist_on_gone_and_diff(monkeypatch):
    monkeypatch.setattr(informer_mod, "BACKOFF_MIN_S", 0.001)
    server = Server([
        _Resp(200, {"metadata": {"resourceVersion": "10"},
                    "items": [_obj("a", 5), _obj("b", 6)]}),
        _Resp(200, events=[{"type": "MODIFIED", "object": _obj("a", 11, app="x")},
                           {"type": "BOOKMARK", "object": {"metadata":
                                                           {"resourceVersion": "12"}}}]),
        ConnectionResetError("server restarted"),
        _Resp(200, events=[{"type": "ERROR", "object": {"code": 410, "message": "too old"}}]),
        _Resp(200, {"metadata": {"resourceVersion": "20"},
                    "items": [_obj("a", 11, app="x"), _obj("c", 19)]}),
        _Resp(200, events=[{"type": "DELETED", "object": _obj("c", 21)}], block=True),
    ])
    seen: list[tuple[str, str]] = []

    async def handler(kind, obj):
        seen.append((kind, obj["metadata"]["name"]))
        if obj["metadata"]["name"] == "b" and kind == "ADDED":
            raise RuntimeError("a bad object must not stop the watch")

    async def run():
        inf = Informer("Pod", "v1", server, handler)
        task = asyncio.create_task(inf.run())
        for _ in range(200):
            if len(server.calls) == 6 and ("DELETED", "c") in seen:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return inf

    inf = asyncio.run(run())
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"),
                    ("ADDED", "c"), ("DELETED", "b"), ("DELETED", "c")]
    # the first watch starts at the list's version; after a bookmark and a dropped
    # connection the next watch resumes from the bookmark, not from a relist
    assert server.calls[1]["resource_version"] == "10"
    assert server.calls[2]["resource_version"] == "12"
    assert server.calls[3]["resource_version"] == "12"
    assert "watch" not in server.calls[4]  # 410: a fresh list
    assert server.calls[5]["resource_version"] == "20"
    assert set(inf.cache) == {("default", "a")}
    assert inf.cache[("default", "a")]["kind"] == "Pod"
    assert inf.stats["relists_gone"] == 1 and inf.stats["lists"] == 2
    assert inf.stats["errors"] == 1 and "server restarted" in inf.last_error
    assert inf.synced.is_set()


def test_http_410_on_watch_start_also_relists(monkeypatch):
    monkeypatch.setattr(informer_mod, "BACKOFF_MIN_S", 0.001)
    server = Server([
        _Resp(200, {"metadata": {"resourceVersion": "3"}, "items": []}),
        _Resp(410),
        _Resp(200, {"metadata": {"resourceVersion": "9"}, "items": [_obj("z", 8)]}),
        _Resp(200, block=True),
    ])
    seen = []

    async def handler(kind, obj):
        seen.append((kind, obj["metadata"]["name"]))

    async def run():
        inf = Informer("Pod", "v1", server, handler)
        task = asyncio.create_task(inf.run())
        for _ in range(200):
            if len(server.calls) == 4:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert seen == [("ADDED", "z")]
    assert server.calls[3]["resource_version"] == "9"


def test_list_error_is_retried_and_not_synced(monkeypatch):
    monkeypatch.setattr(informer_mod, "BACKOFF_MIN_S", 0.001)
    server = Server([_Resp(403, {"message": "forbidden"}),
                     _Resp(200, {"metadata": {"resourceVersion": "1"}, "items": []}),
                     _Resp(200, block=True)])

    async def handler(kind, obj):
        pass

    async def run():
        inf = Informer("Pod", "v1", server, handler)
        task = asyncio.create_task(inf.run())
        await asyncio.sleep(0)
        assert not inf.synced.is_set()
        await asyncio.wait_for(inf.synced.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return inf

    inf = asyncio.run(run())
    assert "HTTP 403" in inf.last_error


def test_missing_crd_counts_as_none_and_is_asked_again(monkeypatch):
    monkeypatch.setattr(informer_mod, "BACKOFF_MIN_S", 0.001)
    server = Server([_Resp(404, {"message": "the server could not find the resource"}),
                     _Resp(404, {"message": "still not there"}),
                     _Resp(200, {"metadata": {"resourceVersion": "4"},
                                 "items": [_obj("rule1", 3)]}),
                     _Resp(200, block=True)])
    seen = []

    async def handler(kind, obj):
        seen.append((kind, obj["metadata"]["name"]))

    async def run():
        inf = Informer("CiliumNetworkPolicy", "cilium.io/v2", server, handler, optional=True)
        task = asyncio.create_task(inf.run())
        await asyncio.wait_for(inf.synced.wait(), 5)
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert seen == [("ADDED", "rule1")]
