"""What one `pylium-cni` invocation means: the verbs (ADD, DEL, CHECK, VERSION, STATUS, GC)
on the CNI environment and the network config, answered as the exit code and the JSON the
plugin prints. The one place the CNI semantics live: the agent runs it for every exec
(`POST /v1/cni`, `pylium.agent.routes_cni`), the executables the runtime starts only carry
the environment and stdin to the agent and its answer back (`pylium.cni.plugin`, and the
native transport `native/pylium-cni.c`).

The agent is reached through an `AgentPort`; the agent's own port calls the endpoint
manager directly. Its errors map to CNI codes: a clash with a create or delete in progress
(`Conflict`) and an agent not ready (`PyliumError`) are 11 "try again later", a refused
request (`UserError`) is 999. Stdlib only (plus pylium's stdlib-only helpers), so the Python
transport can run it without the agent: with `Unreachable` as the port, a config the agent
would refuse is still reported precisely and everything else is 11."""

from __future__ import annotations

import json
import os

from pylium.cni import spec
from pylium.cni.spec import CNIError
from pylium.errors import Conflict, PyliumError, UserError

#: `typing` costs milliseconds at import: the names below are for type checkers only
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine, Mapping
    from typing import Any, Protocol, TypeVar

    T = TypeVar("T")

    class AgentPort(Protocol):
        async def create(self, name: str, namespace: str, netns: str, container_id: str,
                         ifname: str) -> dict[str, Any]:
            """The endpoint made (or already made) for the container, with `gateway`."""

        async def delete(self, container_id: str, ifname: str) -> None: ...

        async def check(self, container_id: str, ifname: str) -> dict[str, Any] | None:
            """{"endpoint", "problems"}, or None when the container has no endpoint."""

        async def components(self) -> list[str]: ...

        async def gc(self, valid: list[dict[str, str]]) -> dict[str, Any]: ...

#: the agent's default API socket (pylium.config.DEFAULT_SOCKET, not imported: it pulls in
#: the whole config machinery)
DEFAULT_SOCKET = "/var/run/pylium/pylium.sock"
#: the route the transports send every invocation to, and the header with the exit code
ROUTE = "/v1/cni"
EXIT_HEADER = "Pylium-CNI-Exit"


class Unreachable:
    """The port of an agent that cannot be reached: every request is 11 (try again)."""

    def __init__(self, msg: str, details: str):
        self.error = CNIError(spec.TRY_AGAIN_LATER, msg, details)

    async def _fail(self, *_args: Any) -> Any:
        raise self.error

    create = delete = check = components = gc = _fail


async def _call(what: str, awaitable: Awaitable[T]) -> T:
    """The port's answer; its errors as CNI errors."""
    try:
        return await awaitable
    except CNIError:
        raise
    except Conflict as exc:
        raise CNIError(spec.TRY_AGAIN_LATER, f"{what} must wait", str(exc)) from None
    except UserError as exc:
        raise CNIError(spec.FAILURE, f"{what} failed", str(exc)) from None
    except PyliumError as exc:
        raise CNIError(spec.TRY_AGAIN_LATER, f"{what}: the agent is not ready",
                       str(exc)) from None


# verbs --------------------------------------------------------------------------------------
async def cmd_add(env: Mapping[str, Any], conf: Mapping[str, Any], settings: Mapping[str, Any],
                  agent: AgentPort, version: str) -> dict[str, Any]:
    if not os.path.exists(env["netns"]):
        raise CNIError(spec.INVALID_ENVIRONMENT, "CNI_NETNS does not exist", env["netns"])
    name, namespace = spec.endpoint_identity(env)
    endpoint = await _call(f"creating the endpoint of container {env['container_id']}",
                           agent.create(name, namespace, env["netns"], env["container_id"],
                                        env["ifname"]))
    return spec.add_result(version, endpoint, env["netns"], settings["dns"])


async def cmd_del(env: Mapping[str, Any], agent: AgentPort) -> None:
    await _call(f"deleting the endpoint of container {env['container_id']}",
                agent.delete(env["container_id"], env["ifname"]))


async def cmd_check(env: Mapping[str, Any], conf: Mapping[str, Any], agent: AgentPort,
                    version: str) -> None:
    if not spec.at_least(version, "0.4.0"):
        raise CNIError(spec.INCOMPATIBLE_VERSION, "config version does not allow CHECK",
                       f"cniVersion {version}; CHECK needs 0.4.0 or later")
    if "prevResult" not in conf:
        raise CNIError(spec.INVALID_CONFIG, "CHECK needs prevResult (the ADD's result)")
    data = await _call("checking the endpoint",
                       agent.check(env["container_id"], env["ifname"]))
    if data is None:
        raise CNIError(spec.FAILURE, f"container {env['container_id']} has no pylium "
                       "endpoint", f"container {env['container_id']} has no endpoint with "
                       f"interface {env['ifname']}")
    problems = list(data["problems"]) + spec.check_against(conf["prevResult"],
                                                           data["endpoint"], env)
    if problems:
        raise CNIError(spec.FAILURE, f"container {env['container_id']}'s network is not as "
                       "ADD left it", "; ".join(problems))


async def cmd_status(agent: AgentPort) -> None:
    try:
        components = await _call("asking the agent's status", agent.components())
    except CNIError as exc:
        raise CNIError(spec.PLUGIN_NOT_AVAILABLE, "plugin not available: "
                       f"{exc.msg}", exc.details) from None
    if "endpoint" not in components:
        raise CNIError(spec.PLUGIN_NOT_AVAILABLE, "plugin not available: the agent runs no "
                       "endpoint manager")


async def cmd_gc(conf: Mapping[str, Any], agent: AgentPort) -> None:
    await _call("garbage collection", agent.gc(spec.valid_attachments(conf)))


def _spoken(asked: Any) -> str:
    """The version to answer in: the one asked for when we speak it, else the latest."""
    return asked if asked in spec.SUPPORTED_VERSIONS else spec.LATEST


def version_answer(conf: Mapping[str, Any]) -> dict[str, Any]:
    return {"cniVersion": _spoken(conf.get("cniVersion")),
            "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


# one invocation -----------------------------------------------------------------------------
async def run(environ: Mapping[str, str], stdin: bytes, agent: AgentPort) -> tuple[int, Any]:
    """One invocation: (exit code, JSON object for stdout or None)."""
    # the config is decoded once (it was twice: for the error objects' version, then for
    # the command); a config that does not decode is reported after the environment
    try:
        decoded: dict[str, Any] | CNIError = spec.decode_config(stdin)
        version = _spoken(decoded.get("cniVersion"))
    except CNIError as exc:
        decoded, version = exc, spec.LATEST
    try:
        env = spec.parse_env(environ)
        if not (stdin.strip() or env["command"] != "VERSION"):
            conf: dict[str, Any] = {}
        elif isinstance(decoded, CNIError):
            raise decoded
        else:
            conf = decoded
        if env["command"] == "VERSION":
            return 0, version_answer(conf)
        version = spec.config_version(conf)
        settings = spec.validate_config(conf)
        command = env["command"]
        if command == "ADD":
            return 0, await cmd_add(env, conf, settings, agent, version)
        if command == "DEL":
            await cmd_del(env, agent)
        elif command == "CHECK":
            await cmd_check(env, conf, agent, version)
        elif command == "STATUS":
            await cmd_status(agent)
        elif command == "GC":
            await cmd_gc(conf, agent)
        return 0, None
    except CNIError as exc:
        return 1, exc.to_json(version)
    except Exception as exc:  # a bug, still reported as a CNI error object
        return 1, CNIError(spec.FAILURE, "internal error in pylium-cni",
                           f"{type(exc).__name__}: {exc}").to_json(version)


def run_now(coro: Coroutine[Any, Any, T]) -> T:
    """A coroutine that never waits (`run` with `Unreachable`), driven without an event
    loop: asyncio costs the Python transport an import it otherwise never needs."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine waited: it needs an event loop")


def reported_version(stdin: bytes) -> str:
    """The cniVersion error objects carry: the config's, when it is one we speak."""
    try:
        return _spoken(spec.decode_config(stdin).get("cniVersion"))
    except CNIError:
        return spec.LATEST


def socket_of(stdin: bytes) -> str:
    """The agent socket the config names (the default when it names none or is not a
    config: the agent then reports what is wrong with it)."""
    try:
        path = spec.decode_config(stdin).get("socket")
    except CNIError:
        return DEFAULT_SOCKET
    return path if isinstance(path, str) and path.startswith("/") else DEFAULT_SOCKET


def output(out: Any) -> bytes:
    """What the plugin prints: one JSON line, or nothing."""
    return b"" if out is None else json.dumps(out).encode() + b"\n"
