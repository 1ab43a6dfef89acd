"""Delivers lifecycle events to the plugins that subscribe to them.

Publishing never waits for a subscriber to finish: plain functions are called at once (a
microsecond's work, like counting, needs no task; keep them short: they run on the event
loop), `async def` ones are awaited in a background task. Every subscriber is called on its
own: one that raises is logged, an async one that hangs is cut off after the configured
timeout, and neither changes what the client receives or what others get.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable

import pluggy
import structlog

from core.events import Event

log = structlog.get_logger("chatbus.bus")


class EventBus:
    def __init__(self, pm: pluggy.PluginManager, timeout: float) -> None:
        self._hooks = pm.hook
        self._timeout = timeout
        self._pending: set[asyncio.Task[None]] = set()

    def publish(self, event: Event) -> None:
        """Call the subscribers now; await the `async def` ones in a background task."""
        waits: list[Awaitable[None]] = []
        for impl in reversed(getattr(self._hooks, event.hook).get_hookimpls()):
            # pluggy's own order (tryfirst first); an impl may leave out the argument.
            try:
                result = impl.function(**({"event": event} if impl.argnames else {}))
            except Exception:
                log.exception("subscriber failed", hook=event.hook, plugin=impl.plugin_name)
                continue
            if inspect.isawaitable(result):
                waits.append(self._await(result, event, impl.plugin_name))
        if waits:  # no task at all when every subscriber is a plain function
            task = asyncio.create_task(self._gather(waits))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait until every event published so far has been delivered (or timed out)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    @staticmethod
    async def _gather(waits: list[Awaitable[None]]) -> None:
        await asyncio.gather(*waits)

    async def _await(self, result: Awaitable[object], event: Event, plugin: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await result
        except TimeoutError:
            log.warning(
                "subscriber timed out", hook=event.hook, plugin=plugin, timeout=self._timeout
            )
        except Exception:
            log.exception("subscriber failed", hook=event.hook, plugin=plugin)
