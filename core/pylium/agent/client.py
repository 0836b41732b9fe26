"""The agent's REST API over its unix socket: the one place that speaks that protocol, for
the CLI, the lab and tests alike. Stdlib only, so the CLI starts fast."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from pylium.errors import AgentUnreachable, UserError


class UnixHTTPConnection(http.client.HTTPConnection):
    """`http.client` over a unix socket (the agent listens on no TCP port)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """JSON requests to one agent; failures become one-line `AgentUnreachable`/`UserError`."""

    def __init__(self, socket_path: str, timeout: float = 30.0):
        self.socket_path = socket_path
        self.timeout = timeout

    def _send(self, conn: UnixHTTPConnection, method: str, path: str, body: Any = None):
        """Send one request; connection problems become one-line `AgentUnreachable`."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnreachable(
                f"cannot reach the pylium agent at {self.socket_path}: {exc.strerror}; "
                "is `pylium agent` running?"
            ) from None
        except PermissionError:
            raise AgentUnreachable(
                f"permission denied on {self.socket_path}: the agent API is root-only"
            ) from None
        except (TimeoutError, OSError) as exc:
            raise AgentUnreachable(f"agent at {self.socket_path} did not answer: {exc}") from None

    @staticmethod
    def _raise_for_status(status: int, raw: bytes) -> None:
        if status < 400:
            return
        try:
            message = json.loads(raw).get("error")
        except (ValueError, AttributeError):
            message = raw.decode(errors="replace")
        raise UserError(message or f"agent answered HTTP {status}")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, method, path, body)
            try:
                raw = response.read()
            except (TimeoutError, OSError) as exc:
                raise AgentUnreachable(
                    f"agent at {self.socket_path} did not answer: {exc}") from None
        finally:
            conn.close()
        self._raise_for_status(response.status, raw)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise AgentUnreachable(f"{self.socket_path} answered HTTP {response.status} with "
                                   "something that is not JSON: is it a pylium agent?") from None

    def stream(self, path: str, timeout: float | None = None) -> Iterator[Any]:
        """GET a newline-delimited JSON response and yield its objects as they arrive
        (chunked streams included). `timeout` bounds each wait for a line (None: forever);
        when it runs out the stream just ends."""
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            response = self._send(conn, "GET", path)
            if response.status >= 400:
                self._raise_for_status(response.status, response.read())
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            while True:
                line = response.readline()
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        except TimeoutError:
            return
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

