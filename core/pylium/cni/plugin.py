"""`pylium-cni` in Python: the transport the runtime execs when the native one
(`native/pylium-cni.c`, built by `make setup`) is not there — a machine without a C
compiler, or the zip bundle for a node without pylium.

Like the native transport it owns no CNI logic: it sends the `CNI_*` environment and stdin in
one request to the agent (`POST /v1/cni` on the socket the config names) and prints the
agent's answer with its exit code; the agent runs `pylium.cni.handler`. VERSION is answered
here, and when the agent cannot be reached the same handler runs here with an unreachable
agent: a config the agent would refuse is reported precisely, anything else is 11 (try again
later). Every failure is a CNI error object on stdout with exit code 1, never a traceback.
Stdlib only and few imports, so each exec starts fast."""

from __future__ import annotations

import _socket  # the C module: `socket.py` imports enum and selectors, ~15% of an exec
import json
import os
import sys

from pylium.cni import handler, spec
from pylium.cni.spec import CNIError

#: `typing` costs milliseconds at import and `pylium-cni` is exec'd for every pod: the
#: names below are for type checkers only (they treat any `TYPE_CHECKING` as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO, Any

#: how long one invocation may wait for the agent (the kubelet gives a sandbox minutes)
AGENT_TIMEOUT_S = 120.0


class BadAnswer(Exception):
    """The agent answered something that is not a CNI answer."""


class Agent:
    """One invocation over the agent's unix socket: a few lines of HTTP/1.1 on a plain
    socket rather than `http.client` (its import costs ~27 ms of CPU, and the runtime execs
    the plugin for every pod operation)."""

    def __init__(self, socket_path: str, timeout: float = AGENT_TIMEOUT_S):
        self.socket_path = socket_path
        self.timeout = timeout

    def invoke(self, environ: Mapping[str, str], stdin: bytes) -> tuple[int, Any]:
        """The agent's (exit code, JSON object or None); raises `_Unreachable` (carrying the
        port the local handler then runs with) or `BadAnswer`."""
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in sorted(environ.items())
                         if k.startswith("CNI_"))
        try:
            status, fields, raw = self._exchange(f"{handler.ROUTE}?{query}", stdin)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _Unreachable("the pylium agent is not running",
                               f"{self.socket_path}: {exc.strerror}") from None
        except TimeoutError:
            raise _Unreachable("the pylium agent did not answer in time",
                               f"{self.socket_path}: no answer within "
                               f"{self.timeout:.0f}s") from None
        except OSError as exc:
            raise _Unreachable("cannot talk to the pylium agent",
                               f"{self.socket_path}: {exc}") from None
        except ValueError as exc:  # a broken chunked body
            raise BadAnswer(f"{self.socket_path}: {exc}") from None
        if status is None and not raw:  # closed without a word: stopping or restarting
            raise _Unreachable("cannot talk to the pylium agent",
                               f"{self.socket_path}: the connection closed without an "
                               "answer")
        if status is None:
            raise BadAnswer(f"{self.socket_path}: not HTTP: {raw[:60]!r}")
        code = fields.get(handler.EXIT_HEADER.lower(), "")
        try:
            out = json.loads(raw) if raw.strip() else None
        except ValueError:
            out = None
            code = ""
        if status != 200 or code not in ("0", "1"):
            error = out.get("error") if isinstance(out, dict) else None
            raise BadAnswer(f"{self.socket_path}: HTTP {status}"
                            + (f": {error}" if error else ""))
        return int(code), out

    def _exchange(self, target: str, payload: bytes
                  ) -> tuple[int | None, dict[str, str], bytes]:
        """One POST with `Connection: close`; the answer is read to EOF (status None: the
        answer is not HTTP)."""
        head = (f"POST {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
            sock.sendall(head.encode() + payload)
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
            return None, {}, header
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in lines[1:])}
        if fields.get("transfer-encoding", "").lower() == "chunked":
            raw = _dechunk(raw)
        return int(parts[1]), fields, raw


class _Unreachable(Exception):
    def __init__(self, msg: str, details: str):
        super().__init__(msg)
        self.port = handler.Unreachable(msg, details)


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


def quote(text: str) -> str:
    """Percent-encode a query key or value (urllib.parse costs an import)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-._~") else
                   "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogateescape"))
                   for c in text)


# entry point ------------------------------------------------------------------------------
def run(environ: Mapping[str, str], stdin: bytes) -> tuple[int, Any]:
    """One invocation: (exit code, JSON object for stdout or None)."""
    if environ.get("CNI_COMMAND") == "VERSION":
        return handler.run_now(handler.run(environ, stdin, handler.Unreachable("", "")))
    agent = Agent(handler.socket_of(stdin))
    try:
        return agent.invoke(environ, stdin)
    except _Unreachable as exc:
        return handler.run_now(handler.run(environ, stdin, exc.port))
    except BadAnswer as exc:
        return 1, CNIError(spec.FAILURE, "the pylium agent answered something that is not "
                           "a CNI answer", str(exc)).to_json(handler.reported_version(stdin))


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
