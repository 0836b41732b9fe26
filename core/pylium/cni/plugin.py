"""`pylium-cni`: the CNI plugin the container runtime executes for every pod sandbox.

It owns no state: ADD asks the node's agent (over its unix socket, `socket` in the network
config) to wire the pod — veth with `CNI_IFNAME` in `CNI_NETNS`, an address from the
agent's IPAM, identity, BPF — as an endpoint keyed by the container id, and turns the
endpoint into a CNI result; DEL, CHECK and GC are the agent's delete, check and GC by
container id; STATUS is the agent's readiness. Every failure is a CNI error object on
stdout with exit code 1, never a traceback. Stdlib only and few imports, so each exec
starts fast."""

from __future__ import annotations

import _socket  # the C module: `socket.py` imports enum and selectors, ~15% of an exec
import json
import os
import sys

from pylium.boundedjson import DocumentError, load_json
from pylium.cni import spec
from pylium.cni.spec import CNIError

#: `typing` costs milliseconds at import and `pylium-cni` is exec'd for every pod: the
#: names below are for type checkers only (they treat any `TYPE_CHECKING` as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO, Any

#: the agent's default API socket (pylium.config.DEFAULT_SOCKET, not imported: it pulls in
#: the whole config machinery)
DEFAULT_SOCKET = "/var/run/pylium/pylium.sock"
#: how long one ADD may wait for the agent (the kubelet gives a sandbox minutes)
AGENT_TIMEOUT_S = 120.0


class Agent:
    """JSON over the agent's unix socket, keeping the HTTP status (409 means "try again").

    A few lines of HTTP/1.1 on a plain socket rather than `pylium.agent.client` (built on
    `http.client`): importing `http.client` costs ~27 ms of CPU, half of what a whole
    `pylium-cni` exec costs, and the runtime execs the plugin for every pod operation."""

    def __init__(self, socket_path: str, timeout: float = AGENT_TIMEOUT_S):
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            status, raw = self._exchange(method, path, body)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise CNIError(spec.TRY_AGAIN_LATER, "the pylium agent is not running",
                           f"{self.socket_path}: {exc.strerror}") from None
        except TimeoutError:
            raise CNIError(spec.TRY_AGAIN_LATER, "the pylium agent did not answer in time",
                           f"{method} {path} on {self.socket_path}: no answer within "
                           f"{self.timeout:.0f}s") from None
        except (OSError, ValueError) as exc:
            raise CNIError(spec.TRY_AGAIN_LATER, "cannot talk to the pylium agent",
                           f"{self.socket_path}: {exc}") from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise CNIError(spec.FAILURE, "the pylium agent answered something that is not "
                           "JSON", f"{self.socket_path}: HTTP {status}") from None
        return status, data

    def _exchange(self, method: str, path: str, body: Any) -> tuple[int, bytes]:
        """One request with `Connection: close`; the answer is read to EOF."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                f"Content-Length: {len(payload)}\r\n")
        if body is not None:
            head += "Content-Type: application/json\r\n"
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.sendall(head.encode() + b"\r\n" + payload)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        finally:
            sock.close()
        header, sep, raw = b"".join(chunks).partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if not sep or len(parts) < 2 or not parts[0].startswith("HTTP/") \
                or not parts[1].isdigit():
            raise ValueError(f"not an HTTP answer: {lines[0][:60]!r}")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:])}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            raw = _dechunk(raw)
        return int(parts[1]), raw

    def call(self, method: str, path: str, body: Any = None, what: str = "") -> Any:
        """The answer of a request that must succeed; agent errors become CNI errors
        (409, a clash with a create or delete in progress: try again later)."""
        status, data = self.request(method, path, body)
        if status < 400:
            return data
        message = data.get("error") if isinstance(data, dict) else None
        message = message or f"HTTP {status}"
        if status == 409:
            raise CNIError(spec.TRY_AGAIN_LATER, f"{what} must wait", message)
        if status == 503:
            raise CNIError(spec.TRY_AGAIN_LATER, f"{what}: the agent is not ready", message)
        raise CNIError(spec.FAILURE, f"{what} failed", message)


def _dechunk(raw: bytes) -> bytes:
    out, rest = [], raw
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


# verbs --------------------------------------------------------------------------------------
def cmd_add(env: Mapping[str, Any], conf: Mapping[str, Any], settings: Mapping[str, Any],
            agent: Agent, version: str) -> dict[str, Any]:
    if not os.path.exists(env["netns"]):
        raise CNIError(spec.INVALID_ENVIRONMENT, "CNI_NETNS does not exist", env["netns"])
    name, namespace = spec.endpoint_identity(env)
    endpoint = agent.call("PUT", f"/v1/endpoint/{quote(name)}",
                          {"namespace": namespace, "netns": env["netns"],
                           "container_id": env["container_id"], "ifname": env["ifname"]},
                          what=f"creating the endpoint of container {env['container_id']}")
    return spec.add_result(version, endpoint, env["netns"], settings["dns"])


def cmd_del(env: Mapping[str, Any], agent: Agent) -> None:
    agent.call("DELETE", _container_path(env),
               what=f"deleting the endpoint of container {env['container_id']}")


def cmd_check(env: Mapping[str, Any], conf: Mapping[str, Any], agent: Agent,
              version: str) -> None:
    if not spec.at_least(version, "0.4.0"):
        raise CNIError(spec.INCOMPATIBLE_VERSION, "config version does not allow CHECK",
                       f"cniVersion {version}; CHECK needs 0.4.0 or later")
    if "prevResult" not in conf:
        raise CNIError(spec.INVALID_CONFIG, "CHECK needs prevResult (the ADD's result)")
    status, data = agent.request("GET", _container_path(env, "/check"))
    if status == 404:
        raise CNIError(spec.FAILURE, f"container {env['container_id']} has no pylium "
                       "endpoint", (data or {}).get("error", ""))
    if status >= 400:
        raise CNIError(spec.FAILURE, "checking the endpoint failed",
                       (data or {}).get("error", f"HTTP {status}"))
    problems = list(data["problems"]) + spec.check_against(conf["prevResult"],
                                                           data["endpoint"], env)
    if problems:
        raise CNIError(spec.FAILURE, f"container {env['container_id']}'s network is not as "
                       "ADD left it", "; ".join(problems))


def cmd_status(agent: Agent) -> None:
    try:
        status = agent.call("GET", "/v1/status", what="asking the agent's status")
    except CNIError as exc:
        raise CNIError(spec.PLUGIN_NOT_AVAILABLE, "plugin not available: "
                       f"{exc.msg}", exc.details) from None
    if "endpoint" not in status.get("components", ()):
        raise CNIError(spec.PLUGIN_NOT_AVAILABLE, "plugin not available: the agent runs no "
                       "endpoint manager")


def cmd_gc(conf: Mapping[str, Any], agent: Agent) -> None:
    valid = spec.valid_attachments(conf)
    agent.call("POST", "/v1/endpoint-gc", {"valid": valid}, what="garbage collection")


def quote(text: str) -> str:
    """Percent-encode a path segment or query value (urllib.parse costs an import)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-._~") else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _container_path(env: Mapping[str, Any], suffix: str = "") -> str:
    return (f"/v1/endpoint/container/{quote(env['container_id'])}{suffix}"
            f"?ifname={quote(env['ifname'])}")


# entry point ------------------------------------------------------------------------------
def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, Any]:
    """One invocation: (exit code, JSON object for stdout or None)."""
    version = _reported_version(stdin)
    try:
        env = spec.parse_env(environ)
        conf = spec.decode_config(stdin) if (stdin.strip() or env["command"] != "VERSION") \
            else {}
        if env["command"] == "VERSION":
            asked = conf.get("cniVersion")
            return 0, {"cniVersion": asked if asked in spec.SUPPORTED_VERSIONS else spec.LATEST,
                       "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
        version = spec.config_version(conf)
        settings = spec.validate_config(conf)
        agent = Agent(settings["socket"] or DEFAULT_SOCKET)
        command = env["command"]
        if command == "ADD":
            return 0, cmd_add(env, conf, settings, agent, version)
        if command == "DEL":
            cmd_del(env, agent)
        elif command == "CHECK":
            cmd_check(env, conf, agent, version)
        elif command == "STATUS":
            cmd_status(agent)
        elif command == "GC":
            cmd_gc(conf, agent)
        return 0, None
    except CNIError as exc:
        return 1, exc.to_json(version)
    except Exception as exc:  # a bug, still reported as a CNI error object
        return 1, CNIError(spec.FAILURE, "internal error in pylium-cni",
                           f"{type(exc).__name__}: {exc}").to_json(version)


def _reported_version(stdin: bytes) -> str:
    """The cniVersion error objects carry: the config's, when it is one we speak."""
    try:
        asked = load_json(stdin, "network config").get("cniVersion")
    except (DocumentError, AttributeError):
        return spec.LATEST
    return asked if asked in spec.SUPPORTED_VERSIONS else spec.LATEST


def main(environ: Mapping[str, str] | None = None, stdin: IO[bytes] | None = None,
         stdout: IO[str] | None = None) -> int:
    stdout = stdout or sys.stdout
    try:
        raw = (stdin or sys.stdin.buffer).read()
    except OSError as exc:
        code, out = 1, CNIError(spec.IO_FAILURE, "cannot read the network config from stdin",
                                str(exc)).to_json(spec.LATEST)
    else:
        code, out = run(os.environ if environ is None else environ, raw)
    if out is not None:
        json.dump(out, stdout)
        stdout.write("\n")
        stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
