"""Delivers lifecycle events to the plugins that subscribe to them.

Publishing never blocks a chat: each event is delivered by a background task. Every
subscriber is called on its own: one that raises is logged, one that hangs is cut off after
the configured timeout, and neither changes what the client receives or what others get.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable

import pluggy
import structlog
from pluggy import HookImpl

from core.events import Event

log = structlog.get_logger("chatbus.bus")


class EventBus:
    def __init__(self, pm: pluggy.PluginManager, timeout: float) -> None:
        self._hooks = pm.hook
        self._timeout = timeout
        self._pending: set[asyncio.Task[None]] = set()

    def publish(self, event: Event) -> None:
        impls = getattr(self._hooks, event.hook).get_hookimpls()
        if not impls:
            return
        task = asyncio.create_task(self._deliver(event, impls))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def drain(self) -> None:
        """Wait until every event published so far has been delivered (or timed out)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _deliver(self, event: Event, impls: list[HookImpl]) -> None:
        waits = []
        for impl in reversed(impls):  # pluggy's own order: tryfirst first, trylast last
            try:
                # A subscriber may leave out the argument: pluggy lets impls take a subset.
                result = impl.function(**({"event": event} if impl.argnames else {}))
            except Exception:
                log.exception("subscriber failed", hook=event.hook, plugin=impl.plugin_name)
                continue
            if inspect.isawaitable(result):
                waits.append(self._await(result, event, impl.plugin_name))
        if waits:
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
