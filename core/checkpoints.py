"""A streaming answer kept now and then, so that a crash loses only what came after the
last checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Checkpoints:
    """While a turn streams, hands its answer so far to `save` every `interval` seconds (when
    it grew), so that a crash keeps what the client saw, up to the last checkpoint. A timer,
    not a check per delta: nothing on the hot path, and a turn shorter than one interval
    costs one timer."""

    def __init__(self, parts: list[str], interval: float, save: Callable[[str], None]) -> None:
        self._parts = parts  # the answer's, growing
        self._interval = interval
        self._save = save
        self._saved = 0  # parts already handed over
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> Checkpoints:
        self._timer = self._loop.call_later(self._interval, self._due)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _due(self) -> None:
        parts = self._parts
        if len(parts) > self._saved:
            self._saved = len(parts)
            self._save("".join(parts))
        self._timer = self._loop.call_later(self._interval, self._due)
