"""FrameWriter on a real aiohttp server on loopback, read by a real client: every frame
arrives, in order; a burst leaves in two writes; a first frame and a lone frame are never
held; a client that left becomes ClientDisconnected."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import ClientConnectionResetError, web

from core.turn import ClientDisconnected
from plugins.transports.frames import HELD_LIMIT, FrameWriter

HEAD, TAIL = b'data: {"text":', b"}\n\n"
Script = Callable[[FrameWriter, "Server"], Awaitable[None]]


class CountingResponse(web.StreamResponse):
    """A real response that also keeps each write it was asked for; from write number
    `reset_at` on, the connection is reset (aiohttp's own error for it)."""

    def __init__(self, reset_at: int | None = None) -> None:
        super().__init__(headers={"Content-Type": "text/event-stream"})
        self.writes: list[bytes] = []
        self.reset_at = reset_at

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.reset_at is not None and len(self.writes) >= self.reset_at:
            raise ClientConnectionResetError("Cannot write to closing transport")
        self.writes.append(bytes(data))
        await super().write(data)


class Server:
    """One route whose handler runs `script` with a FrameWriter, then ends the response."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.response: CountingResponse | None = None
        self.request: web.Request | None = None
        self.reset_at: int | None = None
        self.seen: asyncio.Queue[str] = asyncio.Queue()  # texts the client has read
        self.outcome: asyncio.Future[BaseException | None] = asyncio.Future()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.request = request
        self.response = response = CountingResponse(self.reset_at)
        await response.prepare(request)
        frames = FrameWriter(response, HEAD, TAIL)
        assert self.script is not None
        try:
            await self.script(frames, self)
            await frames.end(b"data: {}\n\n")
        except ClientDisconnected as exc:
            self.outcome.set_result(exc)
        else:
            self.outcome.set_result(None)
        return response


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    server = Server()
    app = web.Application()
    app.router.add_get("/", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/"
    yield server
    await runner.cleanup()


async def read_all(server: Server, script: Script) -> list[str]:
    """Run `script` and read the stream to its end, telling the server each text read."""
    server.script = script
    texts: list[str] = []
    async with aiohttp.ClientSession() as session, session.get(server.url) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                frame = json.loads(line[6:])
                if "text" in frame:
                    texts.append(frame["text"])
                    server.seen.put_nowait(frame["text"])
    return texts


async def test_a_burst_arrives_whole_and_in_order_in_two_writes(server: Server) -> None:
    async def burst(frames: FrameWriter, _: Server) -> None:
        for i in range(20):
            await frames.send(f"t{i} ")  # no wait between: deltas parsed from one read

    texts = await read_all(server, burst)
    assert texts == [f"t{i} " for i in range(20)]
    assert server.response is not None
    writes = server.response.writes
    assert len(writes) == 3  # the first frame, the other 19 together, the closing frame
    assert writes[0] == HEAD + b'"t0 "' + TAIL
    assert writes[1].count(HEAD) == 19
    assert writes[2] == b"data: {}\n\n"


async def test_frames_that_arrive_apart_are_each_written_at_once(server: Server) -> None:
    async def apart(frames: FrameWriter, srv: Server) -> None:
        for i in range(5):
            await frames.send(f"t{i}")
            # The client has this frame before the next one is made: nothing was held.
            assert await asyncio.wait_for(srv.seen.get(), 2) == f"t{i}"

    assert await read_all(server, apart) == [f"t{i}" for i in range(5)]
    assert server.response is not None
    assert len(server.response.writes) == 6


async def test_held_frames_leave_as_soon_as_the_task_waits(server: Server) -> None:
    async def burst_then_pause(frames: FrameWriter, srv: Server) -> None:
        await frames.send("first")
        await frames.send("second")  # held: same step of the task
        assert await asyncio.wait_for(srv.seen.get(), 2) == "first"
        # This wait lets the held frame go, though no further delta comes to push it.
        assert await asyncio.wait_for(srv.seen.get(), 2) == "second"
        await frames.send("third")  # a new burst: written at once

    assert await read_all(server, burst_then_pause) == ["first", "second", "third"]


async def test_a_provider_that_never_waits_holds_little(server: Server) -> None:
    piece = "x" * 1000

    async def flood(frames: FrameWriter, _: Server) -> None:
        for _ in range(300):  # about 300 KB, made without a single wait
            await frames.send(piece)

    assert await read_all(server, flood) == [piece] * 300
    assert server.response is not None
    held_writes = server.response.writes[1:-1]
    assert len(held_writes) >= 4
    assert max(len(w) for w in held_writes) <= HELD_LIMIT + len(HEAD + TAIL) + 1002


async def test_a_client_that_left_becomes_client_disconnected(server: Server) -> None:
    async def endless(frames: FrameWriter, srv: Server) -> None:
        for i in range(10_000):
            await frames.send(f"t{i}")
            await frames.send(f"u{i}")  # held, then written by the flushing task
            await asyncio.sleep(0.005)

    server.script = endless
    async with aiohttp.ClientSession() as session, session.get(server.url) as response:
        await response.content.readline()  # the stream is flowing; then the client leaves
    outcome = await asyncio.wait_for(server.outcome, 5)
    assert isinstance(outcome, ClientDisconnected)


async def test_a_reset_under_held_frames_reaches_the_next_send(server: Server) -> None:
    server.reset_at = 1  # the first frame goes out; the write of the held ones fails

    async def burst(frames: FrameWriter, _: Server) -> None:
        await frames.send("a")
        await frames.send("b")  # held, then its write fails in the flushing task
        await asyncio.sleep(0.05)
        with pytest.raises(ClientDisconnected) as caught:
            await frames.send("c")
        assert isinstance(caught.value.__cause__, ConnectionResetError)
        raise caught.value

    assert await read_all(server, burst) == ["a"]
    assert isinstance(server.outcome.result(), ClientDisconnected)


async def test_end_after_the_client_left_is_quiet(server: Server) -> None:
    async def after_leaving(frames: FrameWriter, srv: Server) -> None:
        await frames.send("a")
        await frames.send("b")  # held
        assert srv.request is not None
        async with asyncio.timeout(5):
            # aiohttp has no event for a closed connection: poll until the server saw it.
            while srv.request.transport is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    server.script = after_leaving
    async with aiohttp.ClientSession() as session, session.get(server.url) as response:
        await response.content.readline()
    # `end` found the connection closed: the turn's record says how it ended, no error here.
    assert await asyncio.wait_for(server.outcome, 5) is None
