"""Retries and fallbacks (core/registry.py, ChatTurn in core/chat.py), against the fake
upstream failing in each way a model can fail before its first delta."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from chatbus.testing.fake_upstream import FakeUpstream
from core.config import Config, ConfigError
from core.history import Status
from core.providers import RateLimited, UpstreamUnavailable
from core.registry import ModelRegistry, Route
from plugins.providers.echo import EchoOptions, EchoProvider
from tests.conftest import Chatbus, StartChatbus

DOWN = {"provider": "openai_compat", "base_url": "http://127.0.0.1:9/v1", "model": "m"}


async def answer(chatbus: Chatbus, model: str) -> tuple[Any, Any]:
    stream = await chatbus.chat(query="hello there", model_name=model)
    (message_id,) = stream.message_ids
    return stream, await chatbus.store.get_message("default", message_id)


@pytest.mark.parametrize(
    ("fault", "value"),
    [("fail_status", 500), ("fail_status", 503), ("fail_status", 429), ("fail_status", 408)],
)
async def test_a_retryable_failure_is_retried(
    chatbus: Chatbus, upstream: FakeUpstream, fault: str, value: int
) -> None:
    setattr(upstream.behaviour, fault, value)
    upstream.behaviour.fail_times = 2
    stream, record = await answer(chatbus, "fake")
    assert stream.text == "Hello from fake upstream"
    assert len(upstream.received) == 3
    assert (record.status, record.model) == (Status.COMPLETED, "fake")


async def test_a_timeout_is_retried(start_chatbus: StartChatbus, upstream: FakeUpstream) -> None:
    chatbus = await start_chatbus(models={"fake": {"read_timeout": 0.2, "retries": 1}})
    upstream.behaviour.first_delay = 0.5
    stream, record = await answer(chatbus, "fake")
    assert stream.frames[-1]["error"]["type"] == "upstream_timeout"
    assert len(upstream.received) == 2
    assert record.status is Status.FAILED


async def test_retries_stop_at_the_configured_count(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(models={"fake": {"retries": 4}})
    upstream.behaviour.fail_status = 502
    stream, record = await answer(chatbus, "fake")
    assert len(upstream.received) == 5
    assert stream.frames[-1]["error"]["type"] == "upstream_unavailable"
    assert record.status is Status.FAILED


async def test_a_failure_that_is_not_retryable_is_not_retried(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.fail_status = 401
    stream, _ = await answer(chatbus, "fake")
    assert len(upstream.received) == 1
    assert stream.frames[-1]["error"]["type"] == "authentication_failed"


async def test_nothing_is_retried_after_the_first_delta(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.break_after = 2
    stream, record = await answer(chatbus, "fake")
    assert len(upstream.received) == 1
    assert stream.text == "Hello from"
    assert (record.status, record.response) == (Status.FAILED, "Hello from")


async def test_fallbacks_in_order_after_the_retries(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(
        models={
            "down": {**DOWN, "retries": 1, "retry_backoff": 0.01, "fallbacks": ["fake", "echo"]},
            "fake": {"retries": 0},
        }
    )
    upstream.behaviour.fail_status = 500
    stream, record = await answer(chatbus, "down")
    assert len(upstream.received) == 1  # "fake" tried once (its own retries: 0), then echo
    assert stream.text == "hello there"
    assert (record.status, record.model) == (Status.COMPLETED, "echo")
    (completed,) = await chatbus.events.wait_for("chat_completed")
    assert completed.model == "echo"  # type: ignore[attr-defined]
    (received,) = chatbus.events.of("chat_received")
    assert received.model == "down"  # type: ignore[attr-defined]


async def test_a_fallback_after_a_failure_that_is_not_retryable(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(models={"fake": {"fallbacks": ["echo"]}})
    upstream.behaviour.fail_status = 400
    upstream.behaviour.fail_message = "This model's maximum context length is 10 tokens"
    stream, record = await answer(chatbus, "fake")
    assert len(upstream.received) == 1
    assert (stream.text, record.model) == ("hello there", "echo")


async def test_model_failed_lines_carry_the_errors_message_without_the_key(
    start_chatbus: StartChatbus, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """#16.7: the log says why a model failed, as the client would be told (keys redacted)."""
    monkeypatch.setenv("FAKE_KEY", "sk-fallback-secret-1")
    chatbus = await start_chatbus(
        models={"fake": {"api_key_env": "FAKE_KEY", "retries": 0, "fallbacks": ["echo"]}}
    )
    upstream.behaviour.fail_status = 503
    upstream.behaviour.fail_message = "overloaded, key sk-fallback-secret-1"
    with structlog.testing.capture_logs() as logs:
        stream, record = await answer(chatbus, "fake")
    assert (stream.text, record.model) == ("hello there", "echo")
    (failed,) = [line for line in logs if line["event"] == "model failed"]
    assert (failed["model"], failed["error"]) == ("fake", "upstream_unavailable")
    assert "overloaded, key [redacted]" in failed["message"]
    assert "sk-fallback-secret-1" not in repr(logs)


async def test_when_every_model_fails_the_last_error_is_reported(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(
        models={"down": {**DOWN, "retries": 0, "fallbacks": ["fake"]}, "fake": {"retries": 0}}
    )
    upstream.behaviour.fail_status = 429
    status, body = await chatbus.chat_json(query="x", model_name="down")
    assert status == 502
    assert body["error"]["type"] == "rate_limited"
    record = await chatbus.store.get_message("default", body["message_id"])
    assert (record.status, record.model) == (Status.FAILED, "fake")  # type: ignore[union-attr]


async def test_models_lists_what_is_configured_and_reachable(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(models={"down": {**DOWN, "retries": 0, "fallbacks": ["echo"]}})
    async with chatbus.http.get(chatbus.url + "/models") as response:
        before = {m["name"]: m for m in (await response.json())["models"]}
    assert set(before) == {"echo", "fake", "down"}
    assert before["echo"]["default"] is True
    assert before["down"]["provider"] == "openai_compat"
    assert before["down"]["fallbacks"] == ["echo"]
    assert {m["reachable"] for m in before.values()} == {None}
    await answer(chatbus, "down")
    async with chatbus.http.get(chatbus.url + "/models") as response:
        after = {m["name"]: m for m in (await response.json())["models"]}
    assert (after["down"]["reachable"], after["down"]["last_error"]) == (
        False,
        "upstream_unavailable",
    )
    assert after["echo"]["reachable"] is True
    assert after["fake"]["reachable"] is None


@pytest.mark.parametrize("fallbacks", [["nope"], ["echo", "itself"]])
def test_fallbacks_must_name_other_configured_models(fallbacks: list[str]) -> None:
    fallbacks = [f if f != "itself" else "main" for f in fallbacks]
    config = Config.model_validate(
        {
            "models": {
                "echo": {"provider": "echo"},
                "main": {"provider": "echo", "fallbacks": fallbacks},
            }
        }
    )
    factories = {"echo": lambda spec, http: EchoProvider(EchoOptions())}
    with pytest.raises(ConfigError, match=r"^models\.main\.fallbacks: '\w+' is not another"):
        ModelRegistry.build(config.models, factories, http=None)  # type: ignore[arg-type]


def route(backoff: float = 1.0) -> Route:
    return Route("m", "echo", EchoProvider(EchoOptions()), 3, backoff, ())


def test_backoff_grows_with_jitter() -> None:
    error = UpstreamUnavailable("down")
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0)):
        delays = {route().delay(attempt, error) for _ in range(50)}
        assert all(base * 0.5 <= delay <= base * 1.5 for delay in delays)
        assert len(delays) > 1  # jittered


def test_backoff_honours_a_reasonable_retry_after() -> None:
    error = RateLimited("slow down")
    error.retry_after = "2"
    assert route().delay(1, error) == 2.0
    error.retry_after = "3600"
    assert route().delay(1, error) == 30.0  # capped
    error.retry_after = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert route().delay(1, error) == 0.0  # a date in the past: now
    error.retry_after = "nan"
    assert 0.5 <= route().delay(1, error) <= 1.5  # unusable: our own schedule
