"""What a turn's life leaves behind: its end stored with the deliveries it owes (the outbox),
its events published, and the background work both need, drained at shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

import pluggy
import structlog

from core.bus import EventBus
from core.config import Config
from core.events import Event
from core.history import HistoryStore, Outcome, StoreUnavailable
from core.outbox import Delivery

log = structlog.get_logger("chatbus.chat")
SAVE_RETRY_FIRST, SAVE_RETRY_MAX = 0.5, 30.0  # seconds between tries to store an answer


class Recorder:
    def __init__(
        self, *, store: HistoryStore, bus: EventBus, hooks: pluggy.HookRelay, config: Config
    ) -> None:
        self.store = store
        self.bus = bus
        self._hooks = hooks
        self._config = config
        self._background: set[asyncio.Task[Any]] = set()

    def plan(self, event: Event) -> list[Delivery]:
        """What plugins say this event owes the outside world (the outbox)."""
        try:
            planned = self._hooks.plan_deliveries(event=event, config=self._config)
        except Exception:
            log.exception("planning deliveries failed", hook=event.hook)
            return []
        return [delivery for deliveries in planned if deliveries for delivery in deliveries]

    async def publish(self, event: Event) -> None:
        """Publish an event that ends no turn; its deliveries go to the outbox first."""
        deliveries = self.plan(event)
        if deliveries:
            try:
                await self.store.outbox.add_deliveries(deliveries)
            except Exception as exc:
                log.error("could not queue deliveries", hook=event.hook,
                          message_id=event.message_id, error=_described(exc))  # fmt: skip
        self.bus.publish(event)

    async def end(self, outcome: Outcome, event: Event, *, retry: bool = True) -> None:
        """Store how a turn ended, with the deliveries its end owes, then publish the end.
        If the store fails, keep trying in the background (unless `retry` is off: then the
        error is the caller's): the answer is never silently dropped."""
        deliveries = self.plan(event)
        try:
            await self.store.finish_message(event.message_id, outcome, deliveries)
        except Exception as exc:
            if not retry:
                raise
            log.warning("could not store the end of a turn; retrying",
                        message_id=event.message_id, error=_described(exc))  # fmt: skip
            self.spawn(self._end_later(event.message_id, outcome, deliveries))
        self.bus.publish(event)

    def checkpoint(self, message_id: str, text: str) -> None:
        """Keep the answer so far (in the background: nothing waits for it)."""
        self.spawn(self._save_partial(message_id, text))

    async def _save_partial(self, message_id: str, text: str) -> None:
        try:
            await self.store.save_partial(message_id, text)
        except Exception as exc:  # a checkpoint missed is not an answer lost: the end is stored
            log.warning("could not checkpoint the answer", error=_described(exc))

    async def _end_later(
        self, message_id: str, outcome: Outcome, deliveries: list[Delivery]
    ) -> None:
        delay = SAVE_RETRY_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self.store.finish_message(message_id, outcome, deliveries)
                except Exception as exc:
                    delay = min(delay * 2, SAVE_RETRY_MAX)
                    log.warning(
                        "could not store the end of a turn; retrying",
                        message_id=message_id, error=_described(exc), next_in=delay,
                    )  # fmt: skip
                else:
                    log.info("stored the end of a turn after retrying", message_id=message_id)
                    return
        except asyncio.CancelledError:
            # Shutting down while the store still fails: the turn stays `streaming` under
            # this instance, whose lease expires, and a live instance ends it `interrupted`
            # with the answer as far as its last checkpoint. The answer is not logged (it
            # may be megabytes, and a log is no store): its size and id say what was cut.
            log.error(
                "could not store the end of a turn before shutting down",
                message_id=message_id,
                status=outcome.status,
                answer_chars=len(outcome.response),
            )
            raise

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in the background; `drain` waits for it."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, grace: float | None = None) -> None:
        """Wait for turns still being recorded and their events; after `grace` seconds,
        give up on what is left (each says so in the log)."""
        deadline = None if grace is None else time.monotonic() + grace
        while self._background:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            _, pending = await asyncio.wait(self._background, timeout=left)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            async with asyncio.timeout(left):
                await self.bus.drain()
        except TimeoutError:
            log.warning("gave up on event subscribers still running at shutdown")


def _described(exc: Exception) -> str:
    """A store's failure for a log line: a StoreUnavailable's message (the stores word it to
    be logged), else only its type: a driver's error may quote the document it could not
    write, and that holds the answer."""
    if isinstance(exc, StoreUnavailable):
        return str(exc)
    return type(exc).__name__
