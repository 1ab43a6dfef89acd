"""What streaming transports share: writers of one frame per delta.

`FrameWriter` writes every frame as its own write (so its own HTTP chunk): chatchat's
clients parse each chunk they read as exactly one frame, and lose text when two share one.
`BurstWriter` joins a burst of frames into one write, for clients that parse the event
stream properly (OpenAI's SDKs): fewer writes, fewer wake-ups of the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from core.turn import ChatTurn, ClientDisconnected, SendChunk, TurnResult

HELD_LIMIT = 64 * 1024  # bytes a BurstWriter holds at most: past it, a burst is written
Closing = Callable[[TurnResult], Awaitable[bytes]]


async def stream_turn(
    frames: FrameWriter, turn: ChatTurn, closing: Closing, send_chunk: SendChunk | None = None
) -> None:
    """The streaming skeleton of every SSE transport: run the turn into `frames` (its text;
    its reasoning and tool-call pieces to `send_chunk`, if given), then write the frames
    `closing` makes of how it ended (a finish, an error); a client gone meanwhile is no
    error (the turn is recorded as cancelled)."""
    try:
        result = await turn.run(frames.send, send_chunk)
        await frames.end(await closing(result))
    except ClientDisconnected:
        pass
    finally:
        frames.close()


class FrameWriter:
    """Writes each delta as one frame, one write each: a pre-encoded `head`, the delta as a
    JSON string, `tail`. A client that is gone becomes `ClientDisconnected` on the next
    `send`, which cancels the turn."""

    def __init__(self, response: web.StreamResponse, head: bytes, tail: bytes) -> None:
        self._response = response
        self._head = head
        self._tail = tail

    async def send(self, text: str) -> None:
        """The turn's `Send`: one delta."""
        await self._write(self._head + orjson.dumps(text) + self._tail)

    async def end(self, *last: bytes) -> None:
        """The transport's closing frames, each its own write. A client gone by now is not an
        error: the turn's record already says how it ended."""
        with contextlib.suppress(ClientDisconnected):
            for frame in last:
                if frame:
                    await self._write(frame)

    def close(self) -> None:
        """The turn ended without `end` (cancelled with its handler): nothing is held."""

    async def _write(self, data: bytes) -> None:
        try:
            await self._response.write(data)
        except OSError as exc:  # reset, or timed out (TCP_USER_TIMEOUT): the client is gone
            raise ClientDisconnected from exc


class BurstWriter(FrameWriter):
    """A FrameWriter that joins bursts: the first frame of a burst is written at once, so the
    first token is never held. Frames made after it, before the turn's task next waits
    (deltas parsed from one network read: a provider hands them over one by one without
    waiting), are held and leave together in one write as soon as the task waits. A write
    wakes the client and costs a system call: a burst of 20 deltas costs 2 writes, not 20.
    Deltas that arrive apart are each written at once.

    Only for clients that split the stream into events themselves: the frames of a burst
    reach the client in one chunk."""

    def __init__(self, response: web.StreamResponse, head: bytes, tail: bytes) -> None:
        super().__init__(response, head, tail)
        self._loop = asyncio.get_running_loop()
        self._held: list[bytes] = []
        self._held_size = 0
        self._in_burst = False  # a frame was written in this step of the turn's task
        self._flushing: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    async def send(self, text: str) -> None:
        await self.send_frame(self._head + orjson.dumps(text) + self._tail)

    async def send_frame(self, frame: bytes) -> None:
        """A whole frame (not a text delta's), in order with the deltas' frames."""
        self._raise_if_failed()
        if self._in_burst or self._flushing is not None:
            self._held.append(frame)
            self._held_size += len(frame)
            if self._held_size > HELD_LIMIT:  # a provider that never waits holds little
                await self._flush()
            return
        self._in_burst = True
        self._loop.call_soon(self._burst_over)  # runs once the task waits
        await self._write(frame)

    async def end(self, *last: bytes) -> None:
        """The held frames and `last`, in one write."""
        self._held.extend(frame for frame in last if frame)
        with contextlib.suppress(ClientDisconnected):
            await self._flush()

    def close(self) -> None:
        """Drop what is held and stop writing it."""
        self._take_held()
        if self._flushing is not None:
            self._flushing.cancel()

    def _burst_over(self) -> None:
        self._in_burst = False
        if self._held and self._flushing is None:
            self._flushing = self._loop.create_task(self._write_held())

    async def _write_held(self) -> None:
        """The flushing task: writes what is held until nothing is (a send meanwhile holds
        its frame, so the order stays), keeping a failure for the turn's next send."""
        try:
            while self._held:
                await self._response.write(self._take_held())
        except Exception as exc:  # a client gone, mostly; nobody awaits this task
            self._failed = exc
        finally:
            self._flushing = None

    async def _flush(self) -> None:
        if self._flushing is not None:
            await asyncio.shield(self._flushing)  # it takes what is held meanwhile too
        elif self._held:
            await self._write(self._take_held())
        self._raise_if_failed()

    def _take_held(self) -> bytes:
        data = b"".join(self._held)
        self._held.clear()
        self._held_size = 0
        return data

    def _raise_if_failed(self) -> None:
        if self._failed is None:
            return
        if isinstance(self._failed, OSError):
            raise ClientDisconnected from self._failed
        raise self._failed
