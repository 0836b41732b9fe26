"""A Consul HTTP API emulator: a test double for the `consul` KV-store plugin's tests.

No Consul agent runs on pylium's build machines (no binary in Debian, PyPI or npm), so the
plugin is tested against this in-memory server, driven by the real `py-consul` client. It is
a test double, not a Consul: one node, no Raft, no ACLs, no datacenters, nothing persisted.
It lives under `tests/` so that no distribution ships it (the lab does not use Consul).

What it implements, following Consul's documented behaviour:
- `GET/PUT/DELETE /v1/kv/<key>` with `recurse`, `keys`, `cas`, `flags`, `acquire`,
  `release`; values base64 in JSON (`null` when empty); 404 for no match.
- Blocking queries: `?index=N&wait=D` holds a KV read until the index passes N or `wait`
  (default 5m, max 10m) ends; every KV read answers `X-Consul-Index`, `X-Consul-KnownLeader`
  and `X-Consul-LastContact`.
- `PUT /v1/txn` with the KV verbs set, cas, lock, unlock, get, get-tree, check-index,
  check-session, check-not-exists, delete, delete-tree, delete-cas: all-or-nothing, one index
  for the whole transaction, 409 with `Errors` on failure.
- Sessions: `PUT /v1/session/create` (TTL, Behavior release|delete, LockDelay),
  `renew`, `destroy`, `GET info|list`. Like Consul, a TTL session is invalidated only after
  `ttl_multiplier` (2) times its TTL without renewal, and invalidation releases or deletes the
  keys it holds and starts the lock-delay on them.
- `GET /v1/status/leader`.

Deliberate simplifications: `X-Consul-Index` is always the KV table's index (Consul may answer
a prefix read with the prefix's own, smaller, max index; both only ever grow with changes,
which is all a client may rely on), and a blocking KV read wakes on any KV change.
`min_ttl` defaults to Consul's 10 s; tests lower it to keep lease tests short.

Run one by hand from the repository root:
`python -m tests.support.consul_emulator --port 8500`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import re
import threading
import time
import uuid
from typing import Any

from aiohttp import web
from pylium.kvstore.testing import free_port

MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0


class TxnError(Exception):
    pass


def parse_duration(text: str) -> float:
    """Consul/Go durations as used here: "10s", "150ms", "1m", "1m30s", "0s", "15"."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _encode(value: bytes) -> str | None:
    return base64.b64encode(value).decode() if value else None


class ConsulState:
    """The KV table and sessions. Every method runs on the server's event loop."""

    def __init__(self, min_ttl: float, ttl_multiplier: float):
        self.min_ttl = min_ttl
        self.ttl_multiplier = ttl_multiplier
        self.index = 1  # Raft index of the last change of any kind
        self.kv_index = 1  # index of the last KV change (X-Consul-Index of KV reads)
        self.kv: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.lock_delays: dict[str, float] = {}
        self.changed = asyncio.Condition()

    # helpers -----------------------------------------------------------------------------
    def entry_json(self, entry: dict[str, Any], with_value: bool = True) -> dict[str, Any]:
        out = {k: entry[k] for k in ("Key", "Flags", "CreateIndex", "ModifyIndex",
                                     "LockIndex")}
        out["Value"] = _encode(entry["Value"]) if with_value else None
        if entry.get("Session"):
            out["Session"] = entry["Session"]
        return out

    def matching(self, kv: dict, prefix: str) -> list[dict]:
        return [kv[k] for k in sorted(kv, key=lambda k: k.encode()) if k.startswith(prefix)]

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # transactions ------------------------------------------------------------------------
    def apply(self, ops: list[dict]) -> list[dict]:
        """Apply KV ops atomically at one new index; raises TxnError(op_index, what)."""
        kv = {k: dict(v) for k, v in self.kv.items()}
        index = self.index + 1
        results: list[dict] = []
        changed = False
        for op_index, op in enumerate(ops):
            if set(op) != {"KV"}:
                raise TxnError(op_index, "only KV operations are supported by this emulator")
            spec = op["KV"]
            try:
                result, did_change = self._apply_one(kv, spec, index)
            except TxnError as exc:
                raise TxnError(op_index, str(exc.args[0])) from None
            changed |= did_change
            results.extend(result)
        if changed:
            self.kv = kv
            self.index = self.kv_index = index
        return results

    def _apply_one(self, kv: dict, spec: dict, index: int) -> tuple[list[dict], bool]:
        verb = spec.get("Verb", "")
        key = spec.get("Key", "")
        value = base64.b64decode(spec["Value"]) if spec.get("Value") else b""
        flags = int(spec.get("Flags") or 0)
        want = int(spec.get("Index") or 0)
        session = spec.get("Session") or ""
        entry = kv.get(key)

        def write(new_session: str | None = None, lock_index_bump: bool = False) -> list[dict]:
            old = kv.get(key)
            kv[key] = {
                "Key": key, "Value": value, "Flags": flags,
                "CreateIndex": old["CreateIndex"] if old else index, "ModifyIndex": index,
                "LockIndex": (old["LockIndex"] if old else 0) + (1 if lock_index_bump else 0),
                "Session": (old.get("Session", "") if old else "") if new_session is None
                else new_session,
            }
            return [{"KV": self.entry_json(kv[key], with_value=False)}]

        if verb == "set":
            return write(), True
        if verb == "cas":
            current = entry["ModifyIndex"] if entry else 0
            if current != want:
                raise TxnError(f'failed to set key "{key}", index is stale')
            return write(), True
        if verb in ("lock", "unlock"):
            if verb == "lock":
                self._check_lock(kv, key, session)
                if entry and entry.get("Session") == session:
                    return write(), True
                return write(new_session=session, lock_index_bump=True), True
            if not entry or entry.get("Session") != session:
                raise TxnError(f'failed to unlock key "{key}", lock isn\'t held, '
                               "or is held by another session")
            return write(new_session=""), True
        if verb == "get":
            if entry is None:
                raise TxnError(f'key "{key}" doesn\'t exist')
            return [{"KV": self.entry_json(entry)}], False
        if verb == "get-tree":
            return [{"KV": self.entry_json(e)} for e in self.matching(kv, key)], False
        if verb == "check-index":
            if entry is None or entry["ModifyIndex"] != want:
                raise TxnError(f'current modify index {entry["ModifyIndex"] if entry else 0} '
                               f'for key "{key}" does not match {want}')
            return [], False
        if verb == "check-session":
            if entry is None or entry.get("Session") != session:
                raise TxnError(f'failed session check for key "{key}"')
            return [], False
        if verb == "check-not-exists":
            if entry is not None:
                raise TxnError(f'key "{key}" exists')
            return [], False
        if verb == "delete":
            return [], kv.pop(key, None) is not None
        if verb == "delete-tree":
            doomed = [e["Key"] for e in self.matching(kv, key)]
            for k in doomed:
                del kv[k]
            return [], bool(doomed)
        if verb == "delete-cas":
            if entry is None or entry["ModifyIndex"] != want:
                raise TxnError(f'failed to delete key "{key}", index is stale')
            del kv[key]
            return [], True
        raise TxnError(f"unknown KV verb {verb!r}")

    def _check_lock(self, kv: dict, key: str, session: str) -> None:
        if session not in self.sessions:
            raise TxnError(f'invalid session "{session}"')
        entry = kv.get(key)
        if entry and entry.get("Session") and entry["Session"] != session:
            raise TxnError(f'failed to lock key "{key}", lock is already held')
        if self.lock_delays.get(key, 0) > time.monotonic():
            raise TxnError(f'failed to lock key "{key}", lock-delay is in effect')

    # sessions ----------------------------------------------------------------------------
    def create_session(self, body: dict) -> str:
        ttl = 0.0
        if body.get("TTL"):
            ttl = parse_duration(body["TTL"])
            if ttl and not self.min_ttl <= ttl <= 86400:
                raise ValueError(f"Invalid Session TTL '{body['TTL']}', must be between "
                                 f"[{self.min_ttl:g}s={86400}s]")
        behavior = body.get("Behavior") or "release"
        if behavior not in ("release", "delete"):
            raise ValueError(f"Invalid Behavior setting '{behavior}'")
        session_id = str(uuid.uuid4())
        self.index += 1
        self.sessions[session_id] = {
            "ID": session_id, "Name": body.get("Name", ""), "Node": body.get("Node", "emulator"),
            "LockDelay": int(parse_duration(body.get("LockDelay", "15s")) * 1e9),
            "Behavior": behavior, "TTL": body.get("TTL", ""), "CreateIndex": self.index,
            "ModifyIndex": self.index, "ttl": ttl,
            "expires": time.monotonic() + ttl * self.ttl_multiplier if ttl else None,
        }
        return session_id

    def session_json(self, session: dict) -> dict:
        return {k: v for k, v in session.items() if k not in ("ttl", "expires")}

    def renew(self, session_id: str) -> dict | None:
        session = self.sessions.get(session_id)
        if session is None:
            return None
        if session["ttl"]:
            session["expires"] = time.monotonic() + session["ttl"] * self.ttl_multiplier
        return session

    def invalidate(self, session_id: str) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.index += 1
        held = [k for k, e in self.kv.items() if e.get("Session") == session_id]
        delay = session["LockDelay"] / 1e9
        for key in held:
            if delay:
                self.lock_delays[key] = time.monotonic() + delay
            if session["Behavior"] == "delete":
                del self.kv[key]
            else:
                self.kv[key] = {**self.kv[key], "Session": "", "ModifyIndex": self.index}
        if held:
            self.kv_index = self.index
        return True

    def expire_sessions(self) -> bool:
        now = time.monotonic()
        expired = [sid for sid, s in self.sessions.items() if s["expires"] and s["expires"] < now]
        for session_id in expired:
            self.invalidate(session_id)
        return bool(expired)


class ConsulEmulator:
    """The emulator on 127.0.0.1, in its own thread and event loop (usable from any test,
    sync or async): `with ConsulEmulator() as consul: consul.address`."""

    def __init__(self, port: int | None = None, min_ttl: float = 10.0,
                 ttl_multiplier: float = 2.0):
        self.port = port or free_port()
        self.min_ttl = min_ttl
        self.ttl_multiplier = ttl_multiplier
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task | None = None
        self.state: ConsulState | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    # server ------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        state = self.state
        app = web.Application()

        def kv_headers() -> dict[str, str]:
            return {"X-Consul-Index": str(state.kv_index), "X-Consul-KnownLeader": "true",
                    "X-Consul-LastContact": "0"}

        def error(status: int, text: str) -> web.Response:
            return web.Response(status=status, text=text)

        async def kv_get(request: web.Request) -> web.Response:
            key = request.match_info["key"]
            q = request.query
            if "index" in q:
                try:
                    index = int(q["index"])
                    wait = min(parse_duration(q["wait"]), MAX_WAIT) if "wait" in q \
                        else DEFAULT_WAIT
                except ValueError as exc:
                    return error(400, f"Invalid blocking query: {exc}")
                deadline = time.monotonic() + wait
                async with state.changed:
                    while state.kv_index <= index:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            async with asyncio.timeout(remaining):
                                await state.changed.wait()
                        except TimeoutError:
                            break
            if "recurse" in q or "keys" in q:
                entries = state.matching(state.kv, key)
            else:
                entries = [state.kv[key]] if key in state.kv else []
            if not entries:
                return web.Response(status=404, headers=kv_headers())
            if "keys" in q:
                return web.json_response([e["Key"] for e in entries], headers=kv_headers())
            return web.json_response([state.entry_json(e) for e in entries],
                                     headers=kv_headers())

        async def kv_put(request: web.Request) -> web.Response:
            key = request.match_info["key"]
            q = request.query
            body = await request.read()
            spec: dict[str, Any] = {"Verb": "set", "Key": key, "Value": _encode(body),
                                    "Flags": int(q.get("flags", 0))}
            # the same precedence as Consul's kvs_endpoint: release > acquire > cas
            if "cas" in q:
                spec.update(Verb="cas", Index=int(q["cas"]))
            if "acquire" in q:
                spec.update(Verb="lock", Session=q["acquire"])
            if "release" in q:
                spec.update(Verb="unlock", Session=q["release"])
            try:
                state.apply([{"KV": spec}])
            except TxnError as exc:
                what = exc.args[1]
                if what.startswith("invalid session"):
                    return error(500, what)
                return web.json_response(False)
            await state.notify()
            return web.json_response(True)

        async def kv_delete(request: web.Request) -> web.Response:
            key = request.match_info["key"]
            q = request.query
            if "cas" in q:
                spec = {"Verb": "delete-cas", "Key": key, "Index": int(q["cas"])}
            elif "recurse" in q:
                spec = {"Verb": "delete-tree", "Key": key}
            else:
                spec = {"Verb": "delete", "Key": key}
            try:
                state.apply([{"KV": spec}])
            except TxnError:
                return web.json_response(False)
            await state.notify()
            return web.json_response(True)

        async def txn(request: web.Request) -> web.Response:
            try:
                ops = json.loads(await request.read())
                if not isinstance(ops, list):
                    raise ValueError("transaction must be a list of operations")
            except ValueError as exc:
                return error(400, f"Failed to parse body: {exc}")
            if len(ops) > 64:
                return error(413, "Transaction contains too many operations (64 max)")
            try:
                results = state.apply(ops)
            except TxnError as exc:
                return web.json_response(
                    {"Results": None, "Errors": [{"OpIndex": exc.args[0], "What": exc.args[1]}]},
                    status=409)
            await state.notify()
            return web.json_response({"Results": results, "Errors": None},
                                     headers={"X-Consul-Index": str(state.index)})

        async def session_create(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw.strip() else {}
                body = {k[:1].upper() + k[1:]: v for k, v in body.items()}
                body.setdefault("LockDelay", "15s")
                # py-consul sends lower-case field names: Consul accepts either
                if "Lockdelay" in body:
                    body["LockDelay"] = body.pop("Lockdelay")
                session_id = state.create_session(body)
            except ValueError as exc:
                return error(500, str(exc))
            return web.json_response({"ID": session_id})

        async def session_renew(request: web.Request) -> web.Response:
            session = state.renew(request.match_info["id"])
            if session is None:
                return error(404, f"Session id '{request.match_info['id']}' not found")
            return web.json_response([state.session_json(session)])

        async def session_destroy(request: web.Request) -> web.Response:
            if state.invalidate(request.match_info["id"]):
                await state.notify()
            return web.json_response(True)

        async def session_info(request: web.Request) -> web.Response:
            session = state.sessions.get(request.match_info["id"])
            return web.json_response([state.session_json(session)] if session else None,
                                     headers={"X-Consul-Index": str(state.index)})

        async def session_list(_request: web.Request) -> web.Response:
            return web.json_response([state.session_json(s) for s in state.sessions.values()],
                                     headers={"X-Consul-Index": str(state.index)})

        async def leader(_request: web.Request) -> web.Response:
            return web.json_response(f"127.0.0.1:{self.port}")

        app.router.add_get("/v1/kv/{key:.*}", kv_get)
        app.router.add_put("/v1/kv/{key:.*}", kv_put)
        app.router.add_delete("/v1/kv/{key:.*}", kv_delete)
        app.router.add_put("/v1/txn", txn)
        app.router.add_put("/v1/session/create", session_create)
        app.router.add_put("/v1/session/renew/{id}", session_renew)
        app.router.add_put("/v1/session/destroy/{id}", session_destroy)
        app.router.add_get("/v1/session/info/{id}", session_info)
        app.router.add_get("/v1/session/list", session_list)
        app.router.add_get("/v1/status/leader", leader)
        return app

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self.state.expire_sessions():
                await self.state.notify()

    async def start_async(self) -> None:
        self.state = ConsulState(self.min_ttl, self.ttl_multiplier)
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop_async(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()

    # thread wrapper ----------------------------------------------------------------------
    def start(self) -> ConsulEmulator:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="consul-emulator")
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start_async(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> ConsulEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def snapshot(self) -> dict[str, Any]:
        """A copy of the emulator's KV table (for assertions)."""
        async def copy_kv():
            return copy.deepcopy(self.state.kv)
        return asyncio.run_coroutine_threadsafe(copy_kv(), self._loop).result(10)


def main() -> None:
    parser = argparse.ArgumentParser(description="Consul HTTP API emulator (tests only)")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--min-ttl", type=float, default=10.0)
    args = parser.parse_args()
    emulator = ConsulEmulator(port=args.port, min_ttl=args.min_ttl)

    async def serve():
        await emulator.start_async()
        print(f"consul emulator on {emulator.url}", flush=True)
        await asyncio.Event().wait()
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
