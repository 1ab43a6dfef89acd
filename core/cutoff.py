"""How a shutdown ends the answers under way: they have the grace to finish, then they are
cut short (`ShuttingDown`), and what is left of the shutdown is known to those who must
finish within it (the turns' ends, the webhook deliverer)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from core.providers import ShuttingDown

log = structlog.get_logger("chatbus.chat")
# Seconds a shutdown has after the grace for the ends of the answers it cut (their records,
# last frames, events and deliveries); closing the store and the process's exit take part
# of the rest of the second a shutdown may last past its grace.
CLOSE_SECONDS = 0.6
CUT_SHORT = "chatbus is shutting down; the answer was cut short"


class Cutoff:
    def __init__(self, grace: float) -> None:
        self._grace = grace
        self._answers: set[asyncio.Timeout] = set()  # one per answer under way
        self._no_answers = asyncio.Event()
        self._no_answers.set()
        self._cutting = False  # the grace is over: an answer is cut as soon as it starts
        self._done_by: float | None = None  # the loop time by which a shutdown is done
        self._grace_wait: asyncio.Timeout | None = None  # a shutdown's wait for the answers

    @asynccontextmanager
    async def answering(self) -> AsyncIterator[None]:
        """Around a turn's answer: once a shutdown's grace has run out, it is cut short with
        `ShuttingDown` (at once if it starts after that)."""
        cut = asyncio.timeout(0 if self._cutting else None)
        self._answers.add(cut)
        self._no_answers.clear()
        try:
            async with cut:
                yield
        except TimeoutError:
            if not cut.expired():
                raise
            raise ShuttingDown(CUT_SHORT) from None
        finally:
            self._answers.discard(cut)
            if not self._answers:
                self._no_answers.set()

    @property
    def answers_in_flight(self) -> int:
        return len(self._answers)

    async def stop_answering(self) -> None:
        """Shutdown, once nothing new is accepted: let the answers under way finish for up
        to the grace (or until `end_grace`), then cut the rest short (their transports say
        so, their turns are stored `cancelled`). What is left of the shutdown is
        `time_left()`."""
        loop = asyncio.get_running_loop()
        grace = 0 if self._cutting else self._grace  # the grace was ended before it began
        self._done_by = loop.time() + grace + CLOSE_SECONDS
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace) as self._grace_wait:
                await self._no_answers.wait()
        self._cut_answers()

    def end_grace(self) -> None:
        """Cut the shutdown's grace short (a second Ctrl-C): the answers under way are cut
        now, and what follows has CLOSE_SECONDS."""
        loop = asyncio.get_running_loop()
        self._cutting = True
        if self._grace_wait is not None and not self._grace_wait.expired():
            self._grace_wait.reschedule(loop.time())
        if self._done_by is not None:
            self._done_by = min(self._done_by, loop.time() + CLOSE_SECONDS)

    def _cut_answers(self) -> None:
        loop = asyncio.get_running_loop()
        self._cutting = True
        if self._answers:
            log.warning("the grace ran out: cutting answers short", count=len(self._answers))
        for cut in self._answers:
            if not cut.expired():
                cut.reschedule(loop.time())

    def time_left(self) -> float:
        """Seconds left of a shutdown; before one begins (the CLI's), the whole of it."""
        if self._done_by is None:
            return self._grace + CLOSE_SECONDS
        return max(self._done_by - asyncio.get_running_loop().time(), 0.0)
