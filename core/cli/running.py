"""What the commands share: an event loop to run on, the store opened alone, tables."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from core.config import Config, ConfigError
from core.history import HistoryStore

T = TypeVar("T")


@asynccontextmanager
async def opened_store(config: Config) -> AsyncIterator[HistoryStore]:
    """The configured history store, opened, without the rest of the service."""
    from core.app import make_store
    from core.plugins import plugin_manager

    store = make_store(config, plugin_manager(config))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def config_problem(config: Config, exc: ConfigError) -> str:
    """A configuration problem found while building what the config names, in one line."""
    return f"chatbus: configuration error: {config.source}: {exc}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns aligned, two spaces apart, a header first."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def line(text: str, width: int = 60) -> str:
    """Text on one line, cut at `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def loop_runner() -> asyncio.Runner:
    """An event loop on uvloop when it is installed: the hot path's I/O costs about half."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run(main: Coroutine[Any, Any, T]) -> T:
    with loop_runner() as runner:
        return runner.run(main)
