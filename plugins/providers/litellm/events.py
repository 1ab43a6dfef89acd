"""The longest upstream event litellm may hold: chatbus's aiohttp session for litellm,
whose responses refuse an event longer than the model's `max_event_bytes`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import aiohttp
import structlog

from plugins.providers.litellm.loading import loaded

log = structlog.get_logger("chatbus.litellm")


# --- the event limit ----------------------------------------------------------------------


class EventTooLong(Exception):
    """The upstream sent more than the limit's bytes without ending an event."""


# The limit of the request being made; set only while `acompletion` sends it (so in the task
# and context that open the response), never across a yield.
event_limit: ContextVar[int | None] = ContextVar("chatbus_litellm_event_limit", default=None)
# An event ends at a blank line: "\n\n", "\r\r" or "\r\n\r\n".
_EVENT_END = re.compile(rb"\n\r?\n|\r\r")


class _EventLimitedResponse(aiohttp.ClientResponse):
    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        await super().start(connection)
        limit = event_limit.get()
        if limit is not None:
            self.content = _EventLimitedBody(self.content, limit)  # type: ignore[assignment]
        return self


class _EventLimitedBody:
    """The response body as litellm's transport reads it (`iter_chunked`), counting the bytes
    since the last blank line; anything else is the body's own."""

    def __init__(self, body: aiohttp.StreamReader, limit: int) -> None:
        self._body = body
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        return self._counted(self._body.iter_chunked(n))

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._counted(self._body.iter_any())

    async def _counted(self, reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        run = 0  # bytes of the event not ended yet
        tail = b""  # the last bytes read, for an end split between two reads
        async for chunk in reads:
            seen = tail + chunk
            events = _EVENT_END.split(seen)
            longest = max(run - len(tail), 0) + len(events[0])  # the event under way
            if len(events) > 2:
                longest = max(longest, *map(len, events[1:-1]))
            if longest > self._limit:
                raise EventTooLong(f"the upstream sent an event longer than {self._limit} bytes")
            run = longest if len(events) == 1 else len(events[-1])
            tail = seen[-2:]
            yield chunk


_session: aiohttp.ClientSession | None = None
_session_loop: asyncio.AbstractEventLoop | None = None


def shared_session() -> aiohttp.ClientSession:
    """chatbus's session for litellm, made in the running loop. litellm caches its clients
    whatever the session, so a new session (a new loop, after a close) forgets them."""
    global _session, _session_loop
    loop = asyncio.get_running_loop()
    if _session is None or _session.closed or _session_loop is not loop:
        _forget_litellm_clients()
        _session_loop = loop
        _session = aiohttp.ClientSession(
            response_class=_EventLimitedResponse,
            cookie_jar=aiohttp.DummyCookieJar(),  # one upstream's cookies are not another's
        )
    return _session


def _forget_litellm_clients() -> None:
    cache = getattr(loaded(), "in_memory_llm_clients_cache", None)
    if cache is not None:
        cache.flush_cache()


async def close_shared_session() -> None:
    """Close litellm's cached clients, then the session under them."""
    global _session
    close = getattr(loaded(), "close_litellm_async_clients", None)
    if close is not None:
        try:
            await close()
        except Exception:  # best effort at shut-down
            log.warning("closing litellm's clients failed", exc_info=True)
    _forget_litellm_clients()
    if _session is not None:
        session, _session = _session, None
        await session.close()
