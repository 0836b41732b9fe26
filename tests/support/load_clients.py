"""Load clients the reliability tests run inside a pod's netns until SIGTERM, then print
one JSON line of what they saw (stdout).

    load_clients.py keepalive IP PORT ALLOW_PATH [DENY_PATH|""] [INTERVAL]
        one HTTP/1.1 connection, never reopened: GET ALLOW_PATH every INTERVAL s (200
        expected); every 4th request GET DENY_PATH instead (403 expected: an L7 proxy
        denies it). Prints {"local_port": N} once connected. A broken connection ends it.
    load_clients.py deny IP:PORT [IP:PORT ...]
        a tight loop of TCP connects (one per target every 10 ms, 50 ms timeout) to flows
        policy denies: a connect that succeeds or is refused means a packet got through (a
        leak); a timeout is a drop (one SYN each: the first retransmit would come at 1 s)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

stop = False


def _on_term(_sig, _frame) -> None:
    global stop
    stop = True


def _response(sock: socket.socket, buf: bytearray) -> int:
    """Read one response (status + headers + Content-Length body); its status code."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the peer")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                   if k.strip().lower() == "content-length"), 0)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the peer mid-body")
        rest += chunk
    buf[:] = rest[length:]
    return status


def keepalive(ip: str, port: int, allow: str, deny: str | None, interval: float) -> dict:
    sock = socket.create_connection((ip, port), timeout=5)
    print(json.dumps({"local_port": sock.getsockname()[1]}), flush=True)
    got = {"requests": 0, "ok": 0, "denied": 0, "leaks": 0, "errors": [], "max_gap_s": 0.0}
    buf = bytearray()
    last_ok = time.monotonic()
    while not stop:
        path = deny if deny and got["requests"] % 4 == 3 else allow
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {ip}\r\n\r\n".encode())
            status = _response(sock, buf)
        except OSError as exc:
            got["errors"].append(f"{type(exc).__name__}: {exc}")
            break
        got["requests"] += 1
        now = time.monotonic()
        if path == allow and status == 200:
            got["ok"] += 1
            got["max_gap_s"] = round(max(got["max_gap_s"], now - last_ok), 3)
            last_ok = now
        elif path == deny and status == 403:
            got["denied"] += 1
        elif path == deny:
            got["leaks"] += 1
        else:
            got["errors"].append(f"{path}: HTTP {status}")
        time.sleep(interval)
    sock.close()
    return got


def deny(targets: list[tuple[str, int]], tick: float = 0.01, wait: float = 0.05) -> dict:
    """Every `tick` a new non-blocking connect to each target, each given `wait` to get an
    answer: a window as short as a few ticks in which a denied flow passes is seen."""
    got = {"attempts": 0, "leaks": 0, "leaked": []}
    pending: dict[int, tuple[socket.socket, float, str, int]] = {}  # by fd
    poller = select.poll()
    next_tick = time.monotonic()
    while not stop:
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + tick
            for ip, port in targets:
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex((ip, port))
                pending[sock.fileno()] = (sock, now, ip, port)
                poller.register(sock, select.POLLOUT)
                got["attempts"] += 1
        for fd, _event in poller.poll(max(0, (next_tick - time.monotonic()) * 1000)):
            sock, _, ip, port = pending.pop(fd)
            poller.unregister(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            got["leaks"] += 1  # connected, refused or unreachable: a packet got through
            if len(got["leaked"]) < 10:
                got["leaked"].append(f"{ip}:{port} {os.strerror(err) if err else 'connected'}"
                                     f" at {time.time():.3f}")
            sock.close()
        now = time.monotonic()
        for fd, (sock, since, _ip, _port) in list(pending.items()):
            if now - since > wait:  # no answer: dropped, as policy says
                poller.unregister(fd)
                del pending[fd]
                sock.close()
    for sock, *_ in pending.values():
        sock.close()
    return got


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    if argv[0] == "keepalive":
        result = keepalive(argv[1], int(argv[2]), argv[3], argv[4] if len(argv) > 4 and argv[4] else None,
                           float(argv[5]) if len(argv) > 5 else 0.1)
    elif argv[0] == "deny":
        result = deny([(t.rpartition(":")[0], int(t.rpartition(":")[2])) for t in argv[1:]])
    else:
        print(f"unknown mode {argv[0]!r}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
