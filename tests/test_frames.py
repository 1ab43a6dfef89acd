"""The frame writers on a real aiohttp server on loopback, read by a real client: every frame
arrives, in order, a slow client included; a burst leaves in two writes; a first frame and a
lone frame are never held; a client that left becomes ClientDisconnected, and `end` after
it is quiet; a cancelled handler leaves no write behind."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import ClientConnectionResetError, web

from core.turn import ClientDisconnected
from plugins.transports.frames import HELD_LIMIT, BurstWriter, FrameWriter
from tests.waiting import wait_until

HEAD, TAIL = b'data: {"text":', b"}\n\n"
LAST = b"data: {}\n\n"
Script = Callable[[FrameWriter, "Server"], Awaitable[None]]


class CountingResponse(web.StreamResponse):
    """A real response that also keeps each write it was asked for. The writes numbered in
    `resets` (from 0) fail as a reset connection does (aiohttp's own error for it)."""

    def __init__(self, resets: set[int]) -> None:
        super().__init__(headers={"Content-Type": "text/event-stream"})
        self.writes: list[bytes] = []
        self.resets = resets
        self.attempts = 0
        self.writing = False  # a write is waiting for the client to read (drain)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.attempts += 1
        if self.attempts - 1 in self.resets:
            raise ClientConnectionResetError("Cannot write to closing transport")
        self.writes.append(bytes(data))
        self.writing = True
        try:
            await super().write(data)
        finally:
            self.writing = False


class Server:
    """One route whose handler runs `script` with a BurstWriter and ends the response, as
    the transports do (`end`, then `close` whatever happened)."""

    def __init__(self) -> None:
        self.script: Script | None = None
        self.response: CountingResponse | None = None
        self.request: web.Request | None = None
        self.task: asyncio.Task[object] | None = None
        self.resets: set[int] = set()
        self.seen: asyncio.Queue[str] = asyncio.Queue()  # texts the client has read
        self.outcome: asyncio.Future[BaseException | None] = asyncio.Future()
        self.url = ""
        self.writer: type[FrameWriter] = BurstWriter

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.request = request
        self.task = asyncio.current_task()
        self.response = response = CountingResponse(self.resets)
        await response.prepare(request)
        frames = self.writer(response, HEAD, TAIL)
        assert self.script is not None
        try:
            await self.script(frames, self)
            await frames.end(LAST)
        except (ClientDisconnected, asyncio.CancelledError) as exc:
            self.outcome.set_result(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self.outcome.set_result(None)
        finally:
            frames.close()
        return response


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    server = Server()
    app = web.Application()
    app.router.add_get("/", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/"
    yield server
    await runner.cleanup()


async def read_all(server: Server, script: Script, pause: float = 0.0) -> list[str]:
    """Run `script` and read the stream to its end (after `pause` seconds, if given),
    telling the server each text read."""
    server.script = script
    texts: list[str] = []
    async with aiohttp.ClientSession() as session, session.get(server.url) as response:
        await asyncio.sleep(pause)  # a client that reads late on purpose, not a wait
        async for line in response.content:
            if line.startswith(b"data: "):
                frame = json.loads(line[6:])
                if "text" in frame:
                    texts.append(frame["text"])
                    server.seen.put_nowait(frame["text"])
    return texts


async def test_a_frame_writer_writes_every_frame_of_a_burst_on_its_own(server: Server) -> None:
    server.writer = FrameWriter

    async def burst(frames: FrameWriter, _: Server) -> None:
        for i in range(20):
            await frames.send(f"t{i} ")  # no wait between: deltas parsed from one read

    texts = await read_all(server, burst)
    assert texts == [f"t{i} " for i in range(20)]
    assert server.response is not None
    assert server.response.writes == [HEAD + f'"t{i} "'.encode() + TAIL for i in range(20)] + [LAST]


async def test_a_burst_arrives_whole_and_in_order_in_two_writes(server: Server) -> None:
    async def burst(frames: FrameWriter, _: Server) -> None:
        for i in range(20):
            await frames.send(f"t{i} ")  # no wait between: deltas parsed from one read

    texts = await read_all(server, burst)
    assert texts == [f"t{i} " for i in range(20)]
    assert server.response is not None
    first, rest = server.response.writes  # the first frame; the other 19 and the last bytes
    assert first == HEAD + b'"t0 "' + TAIL
    assert rest.count(HEAD) == 19
    assert rest.endswith(LAST)


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
        for _piece in range(300):  # about 300 KB, made without a single wait
            await frames.send(piece)

    assert await read_all(server, flood) == [piece] * 300
    assert server.response is not None
    held_writes = server.response.writes[1:]
    assert len(held_writes) >= 4
    assert max(len(w) for w in held_writes) <= HELD_LIMIT + len(HEAD + TAIL) + 1002


async def test_frames_keep_their_order_while_the_client_reads_slowly(server: Server) -> None:
    piece = "x" * 1000
    sent_while_writing = 0

    async def bursts(frames: FrameWriter, srv: Server) -> None:
        nonlocal sent_while_writing
        assert srv.request is not None and srv.request.transport is not None
        # Small buffers, so that writes soon wait for the client, which reads only later.
        srv.request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
        )
        srv.request.transport.set_write_buffer_limits(high=4096)
        assert srv.response is not None
        for i in range(3000):
            sent_while_writing += srv.response.writing
            await frames.send(f"{i:04d}{piece}")
            if i % 10 == 9:
                await asyncio.sleep(0)  # the burst ends: its held frames go to be written

    texts = await read_all(server, bursts, pause=0.3)
    assert [text[:4] for text in texts] == [f"{i:04d}" for i in range(3000)]
    assert sent_while_writing > 0  # frames were made while a write waited: they kept order


async def test_a_failed_write_of_held_frames_reaches_the_next_send(server: Server) -> None:
    server.resets = {1}  # only the write of the held frames fails

    async def burst(frames: FrameWriter, srv: Server) -> None:
        await frames.send("a")
        await frames.send("b")  # held, then its write fails in the flushing task
        response = srv.response
        assert response is not None
        await wait_until(lambda: response.attempts == 2, "the write of the held frames")
        with pytest.raises(ClientDisconnected) as caught:
            await frames.send("c")  # not written: the turn learns the client is gone
        assert isinstance(caught.value.__cause__, ConnectionResetError)
        raise caught.value

    assert await read_all(server, burst) == ["a"]
    assert isinstance(server.outcome.result(), ClientDisconnected)
    assert server.response is not None
    assert server.response.attempts == 2


async def test_a_client_that_left_becomes_client_disconnected(server: Server) -> None:
    async def endless(frames: FrameWriter, _: Server) -> None:
        for i in range(10_000):
            await frames.send(f"t{i}")
            await frames.send(f"u{i}")  # held, then written by the flushing task
            await asyncio.sleep(0.005)  # a provider's pace, not a wait

    server.script = endless
    async with aiohttp.ClientSession() as session, session.get(server.url) as response:
        await response.content.readline()  # the stream is flowing; then the client leaves
    outcome = await asyncio.wait_for(server.outcome, 5)
    assert isinstance(outcome, ClientDisconnected)


async def test_end_after_the_client_left_is_quiet(server: Server) -> None:
    server.resets = {1}  # the connection is gone by the time `end` writes what is held

    async def burst(frames: FrameWriter, _: Server) -> None:
        await frames.send("a")
        await frames.send("b")  # held: `end` comes before any wait

    # `end` found the connection closed: the turn's record says how it ended, no error here.
    assert await read_all(server, burst) == ["a"]
    assert server.outcome.result() is None


async def test_a_cancelled_handler_leaves_no_write_behind(server: Server) -> None:
    blocked = asyncio.Event()

    async def flood_then_wait(frames: FrameWriter, srv: Server) -> None:
        assert srv.request is not None and srv.request.transport is not None
        srv.request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 8192
        )
        srv.request.transport.set_write_buffer_limits(high=4096)
        assert srv.response is not None
        while not srv.response.writing:  # until held frames wait for a client that never reads
            await frames.send("x" * 1000)
            await frames.send("y" * 1000)
            await asyncio.sleep(0)  # ends the burst, so the flushing task writes what is held
        blocked.set()
        await asyncio.Event().wait()  # cancelled here, as a handler is at shut-down

    server.script = flood_then_wait
    async with aiohttp.ClientSession() as session, session.get(server.url):
        await asyncio.wait_for(blocked.wait(), 5)
        writing = [t for t in asyncio.all_tasks() if "_write_held" in repr(t.get_coro())]
        assert len(writing) == 1 and not writing[0].done()
        assert server.task is not None
        server.task.cancel()
        assert isinstance(await asyncio.wait_for(server.outcome, 5), asyncio.CancelledError)
        await wait_until(writing[0].done, "the flushing task ended")
        assert writing[0].cancelled()  # `close` stopped it; the client is still connected
