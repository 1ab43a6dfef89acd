"""core/edge.py: slow and idle clients, the connection cap, malformed requests; spoken to
over raw sockets on loopback, since a well-behaved client cannot misbehave on purpose."""

from __future__ import annotations

import asyncio
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import structlog

from tests.conftest import Chatbus, StartChatbus
from tests.test_cli import ROOT, free_port
from tests.waiting import wait_until

BOUND = 10.0  # seconds: generous, for a loaded machine; what is waited on is the socket itself
LIVE = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
PARTIAL = b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
KEY = "sk-test-0123456789abcdefSECRET"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def connection(chatbus: Chatbus) -> AsyncIterator[Connection]:
    parts = urlsplit(chatbus.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def closed_without_answer(reader: asyncio.StreamReader) -> bool:
    """Wait (BOUND at most) for the server to close; True when it sent nothing first."""
    async with asyncio.timeout(BOUND):
        return await reader.read() == b""


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one response with a Content-Length body: (status, body)."""
    async with asyncio.timeout(BOUND):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return status, await reader.readexactly(length)


# Slow and idle clients


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickling"])
async def test_headers_not_complete_in_time_close_the_connection(
    start_chatbus: StartChatbus, trickle: bool
) -> None:
    chatbus = await start_chatbus(server={"header_timeout_seconds": 0.5})
    async with connection(chatbus) as (reader, writer):
        writer.write(PARTIAL)

        async def drip() -> None:  # a byte now and then does not extend the deadline
            while trickle:
                await asyncio.sleep(0.1)  # the client's pace, not a wait
                writer.write(b"x")

        dripping = asyncio.create_task(drip())
        try:
            assert await closed_without_answer(reader)
        finally:
            dripping.cancel()


async def test_a_connection_that_sends_nothing_is_closed(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(server={"header_timeout_seconds": 0.5})
    async with connection(chatbus) as (reader, _):
        assert await closed_without_answer(reader)


async def test_keep_alive_waits_longer_than_headers_then_closes(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(
        server={"header_timeout_seconds": 0.3, "keepalive_timeout_seconds": 1.5}
    )
    async with connection(chatbus) as (reader, writer):
        writer.write(LIVE)
        assert (await response(reader))[0] == 200
        await asyncio.sleep(0.6)  # idle past the header timeout, within keep-alive
        writer.write(LIVE)
        assert (await response(reader))[0] == 200
        started = time.monotonic()
        assert await closed_without_answer(reader)  # idle past keep-alive
        assert time.monotonic() - started >= 1.0


async def test_the_next_request_on_a_kept_alive_connection_has_a_header_deadline(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(
        server={"header_timeout_seconds": 0.5, "keepalive_timeout_seconds": 60}
    )
    async with connection(chatbus) as (reader, writer):
        writer.write(LIVE)
        assert (await response(reader))[0] == 200
        writer.write(PARTIAL)
        assert await closed_without_answer(reader)


async def test_a_stream_outlives_every_timeout(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(
        server={
            "header_timeout_seconds": 0.2,
            "body_timeout_seconds": 0.2,
            "keepalive_timeout_seconds": 0.2,
        },
        models={"slow": {"provider": "echo", "delay": 0.25}},
    )
    stream = await chatbus.chat(query="one two three four five", model_name="slow")
    assert stream.status == 200
    assert stream.text == "one two three four five"
    assert not any("error" in frame for frame in stream.frames)


async def test_a_body_that_does_not_arrive_in_time_is_a_408(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(server={"body_timeout_seconds": 0.5})
    async with connection(chatbus) as (reader, writer):
        writer.write(
            b"POST /chat/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"query": "'
        )
        status, body = await response(reader)
        async with asyncio.timeout(5):  # at once: not after aiohttp's 10 s of lingering
            assert await reader.read() == b""
    assert status == 408
    assert orjson.loads(body)["error"]["type"] == "request_timeout"
    assert await chatbus.store.conversations("default", 10, 0) == []
    assert chatbus.events.events == []


# The connection cap


async def test_past_the_cap_the_oldest_idle_connection_is_closed(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(server={"max_connections": 3})
    async with (
        connection(chatbus) as first,
        connection(chatbus) as second,
        connection(chatbus) as third,
    ):
        for reader, writer in (first, second, third):
            writer.write(LIVE)  # answered: each is open and idle, `first` the longest
            assert (await response(reader))[0] == 200
        with structlog.testing.capture_logs() as logs:
            async with connection(chatbus) as (reader, writer):
                writer.write(LIVE)
                assert (await response(reader))[0] == 200
        assert await closed_without_answer(first[0])
        second[1].write(LIVE)
        assert (await response(second[0]))[0] == 200
    (warning,) = [entry for entry in logs if entry["event"] == "connection limit reached"]
    assert (warning["limit"], warning["log_level"]) == (3, "warning")


async def test_past_the_cap_with_every_connection_busy_a_new_one_is_a_503(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(
        server={"max_connections": 2},
        models={"slow": {"provider": "echo", "delay": 0.2}},
    )
    slow = {"query": "a b c d e", "model_name": "slow", "stream": True}
    streams = [chatbus.http.post(chatbus.url + "/chat/chat", json=slow) for _ in range(2)]
    answers = [await stream.__aenter__() for stream in streams]  # both streaming now
    try:
        async with connection(chatbus) as (reader, writer):
            writer.write(LIVE)
            status, body = await response(reader)
        assert status == 503
        assert orjson.loads(body)["error"]["type"] == "too_many_connections"
        for answer in answers:
            assert b"e" in await answer.read()  # the busy ones were left alone
    finally:
        for stream in streams:
            await stream.__aexit__(None, None, None)


# Malformed requests


def malformed_requests() -> list[bytes]:
    return [
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"\x01\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + KEY.encode()
        + b"A" * 9000
        + b"\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nX-Api-Key " + KEY.encode() + b"\r\n\r\n",
    ]


@pytest.mark.parametrize("raw", malformed_requests(), ids=["control-char", "too-long", "no-colon"])
async def test_a_malformed_request_is_one_log_line_without_its_bytes(
    chatbus: Chatbus,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
) -> None:
    capfd.readouterr()
    with structlog.testing.capture_logs() as logs:
        async with connection(chatbus) as (reader, writer):
            writer.write(raw)
            status, body = await response(reader)
            assert await closed_without_answer(reader)
    printed = capfd.readouterr()
    assert status == 400
    error = orjson.loads(body)["error"]
    assert error["type"] == "bad_request"
    assert KEY not in body.decode()
    (line,) = logs
    assert line["event"] == "malformed request"
    assert line["log_level"] == "warning"
    assert KEY not in repr(logs)
    assert KEY not in printed.out + printed.err  # nor from aiohttp's own logger
    assert "Traceback" not in printed.err
    assert caplog.records == []


async def test_a_body_a_route_left_unread_and_cannot_decode_is_no_traceback(
    chatbus: Chatbus, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"not gzip at all"
    with structlog.testing.capture_logs() as logs:
        async with connection(chatbus) as (reader, writer):
            writer.write(
                b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(garbage), garbage)
            )
            assert (await response(reader))[0] == 200
            assert await closed_without_answer(reader)
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == [
        "malformed request"
    ]
    assert [record.getMessage() for record in caplog.records] == []


async def test_a_burst_of_malformed_requests_is_rate_limited(
    chatbus: Chatbus, capfd: pytest.CaptureFixture[str]
) -> None:
    raw = malformed_requests()[0]
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            async with connection(chatbus) as (reader, writer):
                writer.write(raw)
                assert (await response(reader))[0] == 400
    elapsed = time.monotonic() - started
    printed = capfd.readouterr()
    lines = [entry for entry in logs if entry["event"] == "malformed request"]
    assert 1 <= len(lines) <= 1 + int(elapsed)  # one a second at most
    assert sum(line["suppressed"] for line in lines) + len(lines) <= 100
    assert KEY not in printed.out + printed.err


# Slowloris at a file-descriptor limit, against `chatbus serve` in a subprocess

FD_LIMIT = 1024
SLOW_CLIENTS = 1100
# Lowers the limit, then becomes `chatbus` (no preexec_fn: unsafe in a threaded process).
LIMITED_CHATBUS = [
    sys.executable,
    "-c",
    "import os, resource, sys;"
    f" resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}));"
    " os.execv(sys.executable, [sys.executable, '-m', 'core.cli', *sys.argv[1:]])",
]


@dataclass
class Slowloris:
    """Clients that each hold a connection with a request whose headers never end, a line
    a second, and come back a second after the server closes it."""

    port: int
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    all_in: asyncio.Event = field(default_factory=asyncio.Event)  # each connected once
    more: asyncio.Event = field(default_factory=asyncio.Event)  # one more connected
    connected: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def client(self) -> None:
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(1)  # the attack's pace: it tries again a second later
                continue
            self.connected += 1
            self.more.set()
            if self.connected >= SLOW_CLIENTS:
                self.all_in.set()
            self.writers.add(writer)
            try:
                writer.write(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                await self._drip(reader, writer)
            except OSError:
                pass
            finally:
                self.writers.discard(writer)
                writer.close()
            await asyncio.sleep(1)  # the attack's pace: back a second after a close

    async def reconnected(self, count: int) -> None:
        """Wait until `count` more connections have been made."""
        target = self.connected + count
        while self.connected < target:
            self.more.clear()
            await self.more.wait()

    async def _drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not self.stop.is_set():
            try:
                async with asyncio.timeout(1):
                    await reader.read()  # returns once the server closes
                return
            except TimeoutError:
                writer.write(b"X-Slow: 1\r\n")


async def listening(port: int, process: asyncio.subprocess.Process) -> None:
    async def accepts() -> bool:
        assert process.returncode is None, "chatbus serve exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    await wait_until(accepts, "chatbus serve listening", timeout=15)


def raise_own_fd_limit(wanted: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    return soft, hard


async def test_normal_requests_are_served_under_1100_slowloris_at_1024_fds(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "edge.toml"
    config.write_text(
        'default_model = "echo"\n[models.echo]\nprovider = "echo"\n'
        '[history.sqlite]\npath = "edge.db"\n'
        "[server]\nheader_timeout_seconds = 2\nshutdown_grace_seconds = 1\n"
    )
    log = tmp_path / "serve.log"  # a file, not a pipe: a full pipe would stall the server
    limits = raise_own_fd_limit(SLOW_CLIENTS + 512)
    with log.open("w") as output:
        process = await asyncio.create_subprocess_exec(
            *LIMITED_CHATBUS, "--config", str(config), "serve", "--port", str(port),
            cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    attack = Slowloris(port)
    clients = []
    try:
        await listening(port, process)
        clients = [asyncio.create_task(attack.client()) for _ in range(SLOW_CLIENTS)]
        async with asyncio.timeout(BOUND):
            await attack.all_in.wait()
        url = f"http://127.0.0.1:{port}"
        timeout = aiohttp.ClientTimeout(total=BOUND)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(3):  # while the attack goes on: closed clients keep coming back
                async with asyncio.timeout(BOUND):
                    await attack.reconnected(SLOW_CLIENTS // 2)
                async with http.get(url + "/health/live") as live:
                    assert live.status == 200
                chat = {"query": "still here", "stream": False}
                async with http.post(url + "/chat/chat", json=chat) as answer:
                    assert answer.status == 200
                    assert (await answer.json())["text"] == "still here"
    finally:
        attack.stop.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        for writer in attack.writers:
            writer.close()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await process.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    printed = log.read_text()
    assert "connection limit reached" in printed
    assert "Traceback" not in printed
