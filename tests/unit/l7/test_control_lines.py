"""The agent reads a proxy's control socket with `LineReader` (each line taken as soon as
it is whole, no StreamReader buffer): the lines it takes are the lines `readline()` gave,
however the socket cuts them into chunks, and what ends the reading (the end, a line too
long, a line that does not take) ends it as before."""

from __future__ import annotations

import asyncio
import random

import pytest
from pylium.l7.supervisor import LineReader

LINES = [b'{"op":"hello"}\n', b"x" * 70_000 + b"\n", b"\n", b"short\n",
         b'{"op":"flows"}\x1e"a"\x1e"b"\n', b"y" * 5 + b"\n", b"tail without newline"]


def _chunks(data: bytes, rng: random.Random) -> list[bytes]:
    out, at = [], 0
    while at < len(data):
        size = rng.choice((1, 2, 7, 100, 4096, 65536, 200_000))
        out.append(data[at:at + size])
        at += size
    return out


async def _read_all(reader: asyncio.StreamReader, chunks: list[bytes]) -> list[bytes]:
    """What `ProxySupervisor._read`'s loop gets: readline until b"" (or it raises)."""
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    got = []
    while line := await reader.readline():
        got.append(line)
    return got


@pytest.mark.parametrize("seed", range(5))
def test_lines_are_the_lines_readline_gives_however_they_are_cut(seed):
    chunks = _chunks(b"".join(LINES), random.Random(seed))

    async def run():
        before = await _read_all(asyncio.StreamReader(limit=1 << 24), chunks)
        taken: list[bytes] = []
        reader = LineReader(taken.append, limit=1 << 24, loop=asyncio.get_running_loop())
        assert await _read_all(reader, chunks) == []  # all taken as they came
        return before, taken
    before, taken = asyncio.run(run())
    assert taken == before == LINES


def test_a_line_longer_than_the_limit_raises_as_readline_does():
    async def run(data: bytes, limit: int):
        results = []
        for reader in (asyncio.StreamReader(limit=limit),
                       LineReader(lambda line: None, limit, asyncio.get_running_loop())):
            try:
                await _read_all(reader, [data[:3], data[3:]])
                results.append("read")
            except ValueError:
                results.append("ValueError")
        return results
    for data in (b"a" * 10 + b"\n", b"a" * 11 + b"\n", b"a" * 9 + b"\n", b"a" * 20):
        before, now = asyncio.run(run(data, 10))
        assert before == now, data
    assert asyncio.run(run(b"a" * 20, 10)) == ["ValueError", "ValueError"]


def test_a_line_that_raises_ends_the_reading_and_no_more_is_taken():
    taken = []

    def take(line: bytes) -> None:
        if line.startswith(b"bad"):
            raise ValueError("not the protocol")
        taken.append(line)

    async def run():
        reader = LineReader(take, 1 << 20, asyncio.get_running_loop())
        with pytest.raises(ValueError, match="not the protocol"):
            await _read_all(reader, [b"one\nbad\ntwo\n", b"three\n"])
        stopped = LineReader(taken.append, 1 << 20, asyncio.get_running_loop())
        stopped.feed_data(b"four\nfi")
        stopped.stop()  # the supervisor lets the connection go
        assert await _read_all(stopped, [b"ve\nsix\n"]) == []
    asyncio.run(run())
    assert taken == [b"one\n", b"four\n"]


def test_the_agent_knows_when_more_of_the_proxys_lines_wait():
    """`ProxySupervisor.backlogged`: more lines after the one being taken, in the same
    chunk or still unread in the socket, tell the agent it is behind (it then stops
    offering its CPU between slices of a batch: the proxy's buffer has a bound)."""
    import socket
    from pathlib import Path

    from pylium.l7.supervisor import ProxySupervisor

    async def run():
        sup = ProxySupervisor(Path("/nonexistent"), "x:y", {}, "t", on_flow=lambda f: None)
        seen = []
        loop = asyncio.get_running_loop()
        proxy_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader = LineReader(lambda line: seen.append((line, sup.backlogged())), 1 << 20,
                            loop)
        transport, protocol = await loop.create_unix_connection(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), sock=agent_end)
        sup.reader = reader
        sup.writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        assert not sup.backlogged()
        proxy_end.sendall(b"one\ntwo\nthr")  # two lines and part of a third in one chunk
        while len(seen) < 2:
            await asyncio.sleep(0.01)
        proxy_end.sendall(b"ee\n")
        while len(seen) < 3:
            await asyncio.sleep(0.01)
        transport.pause_reading()  # a line the agent has not read yet (in the socket)
        proxy_end.sendall(b"four\n")
        await asyncio.sleep(0.05)
        waiting = sup.backlogged()
        transport.resume_reading()
        while len(seen) < 4:
            await asyncio.sleep(0.01)
        after = sup.backlogged()
        transport.close()
        proxy_end.close()
        return seen, waiting, after

    seen, waiting, after = asyncio.run(run())
    assert seen == [(b"one\n", True), (b"two\n", True), (b"three\n", False),
                    (b"four\n", False)]
    assert waiting and not after
