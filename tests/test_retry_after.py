"""Retry-After read safely (core/retry_after.py): the helper over a table of what servers
send, and an upstream that sends the worst of it, on both event loops chatbus runs on."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from chatbus.testing.fake_upstream import Behaviour, FakeUpstream
from core.app import create_app
from core.history import Status
from core.plugins import make_plugin_manager
from core.providers import RateLimited
from core.registry import MAX_RETRY_AFTER
from core.retry_after import retry_after_seconds
from core.server import start
from tests.conftest import Chatbus, EventRecorder, make_config
from tests.test_fallbacks import route

DATE = "Sun, 06 Nov 1994 08:49:37 GMT"
AT_DATE = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("2", 2.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("30", 30.0),
        ("3600", 30.0),  # capped
        ("1e308", 30.0),
        ("1" + "0" * 400, 30.0),  # beyond a float: still just "long"
        ("9" * 5000, 30.0),  # beyond int()'s digit limit too
        ("nan", None),
        ("NaN", None),
        ("inf", None),
        ("-inf", None),
        ("Infinity", None),
        ("-1", None),  # not delta-seconds
        ("-0.5", None),
        ("+5", None),
        ("1_000", None),
        ("0x10", None),
        ("\u0663", None),  # an Arabic-Indic digit: not one RFC 9110 knows
        ("garbage", None),
        ("", None),
        ("   ", None),
        (None, None),
        (DATE, 0.0),  # a date in the past: now
        ("Sun, 06 Nov 99999 08:49:37 GMT", None),  # a year no datetime holds
        ("Sun, 06 Nov 1994 25:00:00 GMT", None),
        ("Mon, 31 Dec 9999 23:59:59 GMT", 30.0),  # far away: capped
    ],
)
def test_retry_after_table(value: str | None, expected: float | None) -> None:
    seconds = retry_after_seconds(value, 30.0)
    assert seconds == expected
    assert seconds is None or (isinstance(seconds, float) and math.isfinite(seconds))


@pytest.mark.parametrize(
    "form",
    [DATE, "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"],  # the 3 of RFC 9110
)
def test_an_http_date_is_relative_to_now(form: str) -> None:
    assert retry_after_seconds(form, 30.0, now=AT_DATE - 10) == 10.0
    assert retry_after_seconds(form, 30.0, now=AT_DATE) == 0.0
    assert retry_after_seconds(form, 30.0, now=AT_DATE + 10) == 0.0  # past
    assert retry_after_seconds(form, 30.0, now=AT_DATE - 3600) == 30.0  # capped


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-3", "soon"])
def test_an_unusable_retry_after_is_the_routes_own_backoff(value: str) -> None:
    error = RateLimited("slow down")
    error.retry_after = value
    delay = route().delay(1, error)
    assert math.isfinite(delay) and 0.5 <= delay <= 1.5


def test_an_upstream_is_waited_for_at_most_the_cap() -> None:
    error = RateLimited("slow down")
    error.retry_after = "1" + "0" * 400
    assert route().delay(1, error) == MAX_RETRY_AFTER


# An upstream answering 429 with such a Retry-After: the turn ends, on asyncio's loop and on
# uvloop's (where `asyncio.sleep(nan)` raises), failed after its retries or answered.

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}
UNUSABLE = ["nan", "inf", "-inf", DATE, "soon", "-3"]


@contextlib.asynccontextmanager
async def chatbus_and_upstream(tmp_path: Path) -> AsyncIterator[tuple[Chatbus, FakeUpstream]]:
    """The `start_chatbus` fixture's chatbus, on the loop the test runs itself."""
    async with FakeUpstream() as upstream:
        config = make_config(tmp_path, upstream)
        pm = make_plugin_manager(config.plugins.modules)
        recorder = EventRecorder()
        pm.register(recorder)
        app = create_app(config, pm)
        runner = await start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        bus = Chatbus(url, app, aiohttp.ClientSession(), recorder, runner)
        try:
            yield bus, upstream
        finally:
            await bus.close()


async def rate_limited_turn(tmp_path: Path, retry_after: str, fail_times: int | None) -> None:
    async with chatbus_and_upstream(tmp_path) as (bus, upstream):
        upstream.behaviour = Behaviour(
            fail_status=429, retry_after=retry_after, fail_times=fail_times
        )
        async with asyncio.timeout(20):  # the cap is 30 s: no unusable value may reach it
            status, body = await bus.chat_json(query="x", model_name="fake")
            answered = fail_times is not None
            (event,) = await bus.events.wait_for("chat_completed" if answered else "chat_failed")
        assert len(upstream.received) == (3 if fail_times is None else fail_times + 1)  # 2 retries
        record = await bus.store.get_message("default", body["message_id"])
        assert record is not None and event.message_id == record.message_id
        if answered:
            assert (status, record.status) == (200, Status.COMPLETED)
        else:
            assert (body["error"]["type"], record.status) == ("rate_limited", Status.FAILED)
        async with bus.http.get(bus.url + "/metrics") as response:
            assert "\nchatbus_active_chats 0.0\n" in await response.text()


@pytest.mark.parametrize("loop", RUNNERS)
@pytest.mark.parametrize("retry_after", UNUSABLE)
@pytest.mark.parametrize("fail_times", [None, 1], ids=["always", "once"])
def test_an_upstreams_bad_retry_after_never_strands_a_turn(
    tmp_path: Path, loop: str, retry_after: str, fail_times: int | None
) -> None:
    RUNNERS[loop](rate_limited_turn(tmp_path, retry_after, fail_times))
