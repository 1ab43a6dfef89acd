"""This instance among the ones sharing a store (behind a load balancer, or after a
restart): its lease, renewed by a heartbeat, and the running turns of instances whose lease
expired, ended `interrupted` by whichever live instance claims them first
(core/interrupted.py). Nothing here knows which store it is."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog

from core.chat import ChatService
from core.config import HistoryConfig
from core.history import StoreUnavailable
from core.interrupted import end_interrupted

log = structlog.get_logger("chatbus.instances")


def new_instance_id() -> str:
    """Unique to this process: host and pid for whoever reads the store, and a random part,
    since a restarted process may get a dead one's pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class InstanceLease:
    """Start it before serving: the first heartbeat, then the orphaned turns ended; then both
    every `heartbeat_seconds` until `stop`. A loop never dies of a failure: a store that
    cannot be reached is logged and tried again at the next beat."""

    def __init__(self, service: ChatService, settings: HistoryConfig) -> None:
        self._service = service
        self._lease_seconds = settings.lease_seconds
        self._interval = settings.heartbeat_seconds
        self._held_until = 0.0  # wall clock: this instance's lease, as last renewed
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.renew()
        await self.end_orphaned_turns()
        self._tasks = [
            asyncio.create_task(self._every(self.renew)),
            asyncio.create_task(self._every(self.end_orphaned_turns)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def renew(self) -> None:
        now = time.time()
        lease_until = now + self._lease_seconds
        try:
            await self._service.store.keep_lease(self._service.instance_id, now, lease_until)
        except StoreUnavailable as exc:
            log.warning("could not renew this instance's lease", error=str(exc))
            return
        self._held_until = lease_until

    async def end_orphaned_turns(self) -> None:
        # Only while holding a lease: a turn claimed without one would be orphaned again.
        if self._held_until > time.time():
            await end_interrupted(self._service)

    async def _every(self, work: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await work()
            except Exception as exc:  # a bug in one round must not end the heartbeat
                log.error("instance lease round failed", error=type(exc).__name__)
