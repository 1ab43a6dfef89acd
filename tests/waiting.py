"""Bounded waits on a condition: what a test does instead of sleeping until something
has (probably) happened. A wait ends as soon as the condition holds, and fails the test,
naming what it waited for, when the condition still does not hold after `timeout`."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

INTERVAL = 0.01  # seconds between two looks: cheap checks, and no test waits much past it


@overload
async def wait_until(
    condition: Callable[[], Awaitable[T]],
    what: str = ...,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
) -> T: ...


@overload
async def wait_until(
    condition: Callable[[], T],
    what: str = ...,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
) -> T: ...


async def wait_until(
    condition: Callable[[], Any],
    what: str = "the condition",
    timeout: float = 5.0,  # noqa: ASYNC109 (bounds the whole wait, not one call)
    interval: float = INTERVAL,
) -> Any:
    """Look at `condition()` (awaited if it is a coroutine) every `interval` seconds until it
    is truthy, and return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)


def wait_until_blocking(
    condition: Callable[[], T],
    what: str = "the condition",
    timeout: float = 5.0,
    interval: float = INTERVAL,
) -> T:
    """`wait_until` for code with no event loop (a process started by a test)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)
