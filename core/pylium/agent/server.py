"""The REST API on a unix socket (root only, 0600, like cilium.sock).

Route modules `routes_*.py` in this package each expose `setup(app, daemon)`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import pkgutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from pylium.agent.daemon import Daemon
from pylium.documents import MAX_BYTES, load_json
from pylium.errors import Conflict, PyliumError, UserError

log = logging.getLogger(__name__)

DAEMON_KEY = web.AppKey("daemon", Daemon)


class NotFound(UserError):
    """A resource named in the request does not exist (HTTP 404)."""


@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except NotFound as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except Conflict as exc:
        return web.json_response({"error": str(exc)}, status=409)
    except UserError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except PyliumError as exc:
        return web.json_response({"error": str(exc)}, status=503)
    except Exception as exc:
        log.exception("API %s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                 status=500)


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 naming what is wrong (bounded like every
    untrusted document: size, UTF-8, nesting; see `pylium.documents`)."""
    body = load_json(await request.read(), "request body")
    if not isinstance(body, dict):
        raise UserError("request body must be a JSON object")
    return body


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BYTES)
    app[DAEMON_KEY] = daemon
    import pylium.agent as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("routes_"):
            importlib.import_module(f"pylium.agent.{info.name}").setup(app, daemon)
    return app


def _claim_socket_path(sock_path: Path) -> None:
    """Make room for our socket: refuse if another agent answers on it, remove a stale one."""
    try:
        sock_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {sock_path.parent} for the API socket: "
                        f"{exc.strerror} (run as root or pass --socket)") from None
    if not (sock_path.exists() or sock_path.is_symlink()):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock_path))
    except OSError:
        sock_path.unlink()  # left behind by an agent that died
    else:
        raise UserError(f"another agent is already listening on {sock_path}")
    finally:
        probe.close()


async def _listen(runner: web.AppRunner, sock_path: Path) -> None:
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await web.UnixSite(runner, str(sock_path)).start()
    except OSError as exc:
        raise UserError(f"cannot listen on {sock_path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(sock_path, 0o600)


async def serve(daemon: Daemon, stop: asyncio.Event | None = None,
                after_start: Callable[[], None] | None = None) -> None:
    """Start the daemon and its API; run until SIGTERM/SIGINT or `stop` is set.
    `after_start()` runs once everything started (the agent command settles its garbage
    collector there, `pylium.gcpolicy`)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sock_path = Path(daemon.config.socket)
    _claim_socket_path(sock_path)
    runner: web.AppRunner | None = None
    try:
        await daemon.start()
        if after_start is not None:
            after_start()
        runner = web.AppRunner(make_app(daemon), access_log=None)  # routes see components
        await runner.setup()
        await _listen(runner, sock_path)
        log.info("API listening on %s", sock_path)
        await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()
        await daemon.stop()
        if sock_path.is_socket():
            sock_path.unlink()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
