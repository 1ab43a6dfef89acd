"""What streaming transports share: a writer of one frame per delta, bursts in one write."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from aiohttp import web

from core.turn import ClientDisconnected

HELD_LIMIT = 64 * 1024  # bytes held at most: past it, a burst is written before it goes on


class FrameWriter:
    """Writes each delta as a frame: a pre-encoded `head`, the delta as a JSON string, `tail`.

    The first frame of a burst is written at once, so the first token is never held. Frames
    made after it, before the turn's task next waits (deltas parsed from one network read: a
    provider hands them over one by one without waiting), are held and leave together in one
    write as soon as the task waits. A write wakes the client and costs a system call: a burst
    of 20 deltas costs 2 writes, not 20. Deltas that arrive apart are each written at once.

    A client that is gone becomes `ClientDisconnected` on the next `send`, which cancels the
    turn; `end` writes what is held with the transport's last bytes; `close` drops what is
    held when the turn ended otherwise (cancelled with its handler)."""

    def __init__(self, response: web.StreamResponse, head: bytes, tail: bytes) -> None:
        self._response = response
        self._head = head
        self._tail = tail
        self._loop = asyncio.get_running_loop()
        self._held: list[bytes] = []
        self._held_size = 0
        self._in_burst = False  # a frame was written in this step of the turn's task
        self._flushing: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    async def send(self, text: str) -> None:
        """The turn's `Send`: one delta."""
        self._raise_if_failed()
        frame = self._head + orjson.dumps(text) + self._tail
        if self._in_burst or self._flushing is not None:
            self._held.append(frame)
            self._held_size += len(frame)
            if self._held_size > HELD_LIMIT:  # a provider that never waits holds little
                await self._flush()
            return
        self._in_burst = True
        self._loop.call_soon(self._burst_over)  # runs once the task waits
        try:
            await self._response.write(frame)
        except OSError as exc:  # reset, or timed out (TCP_USER_TIMEOUT): the client is gone
            raise ClientDisconnected from exc

    async def end(self, last: bytes = b"") -> None:
        """The held frames and `last` (the transport's closing frames), in one write. A client
        gone by now is not an error: the turn's record already says how it ended."""
        if last:
            self._held.append(last)
        with contextlib.suppress(ClientDisconnected):
            await self._flush()

    def close(self) -> None:
        """Drop what is held and stop writing it: the turn ended without `end`."""
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
            try:
                await self._response.write(self._take_held())
            except OSError as exc:
                raise ClientDisconnected from exc
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
