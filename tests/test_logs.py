"""core.logs.log_context: what a request, a tenant and a turn bind to their log lines."""

from __future__ import annotations

import asyncio

import structlog

from core.logs import log_context


def bound() -> dict[str, object]:
    return structlog.contextvars.get_contextvars()


def test_values_are_bound_within_and_what_was_there_before_comes_back() -> None:
    with log_context(request_id="outer", tenant="a"):
        with log_context(request_id="inner"):
            assert bound() == {"request_id": "inner", "tenant": "a"}
        assert bound() == {"request_id": "outer", "tenant": "a"}
    assert bound() == {}


def test_a_failure_within_unbinds_too() -> None:
    try:
        with log_context(message_id="m"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert bound() == {}


async def test_concurrent_requests_see_only_their_own() -> None:
    seen: dict[str, object] = {}

    async def request(name: str) -> None:
        with log_context(request_id=name):
            await asyncio.sleep(0)  # the other request binds meanwhile
            seen[name] = bound()["request_id"]

    await asyncio.gather(request("a"), request("b"))
    assert seen == {"a": "a", "b": "b"}
