"""GET /metrics (plugins/metrics.py), read as Prometheus would."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from chatbus.testing.fake_upstream import FakeUpstream
from core.auth import digest
from tests.conftest import Chatbus, StartChatbus


async def scrape(chatbus: Chatbus) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with chatbus.http.get(chatbus.url + "/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_chats_requests_latency_and_tokens(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    await chatbus.chat(query="one two three")
    await chatbus.chat_json(query="four five")
    upstream.behaviour.fail_status = 401
    await chatbus.chat(query="x", model_name="fake")
    await chatbus.chat_json(query="")  # a 422
    await chatbus.events.wait_for("chat_failed")
    metrics = await scrape(chatbus)
    chat = (("method", "POST"), ("route", "/chat/chat"))
    assert metrics[("chatbus_requests_total", (*chat, ("status", "200")))] == 3
    assert metrics[("chatbus_requests_total", (*chat, ("status", "422")))] == 1
    echo_done = (("model", "echo"), ("status", "completed"))
    assert metrics[("chatbus_chat_latency_seconds_count", echo_done)] == 2
    assert (
        metrics[("chatbus_chat_latency_seconds_count", (("model", "fake"), ("status", "failed")))]
        == 1
    )
    assert metrics[("chatbus_time_to_first_token_seconds_count", (("model", "echo"),))] == 2
    assert metrics[("chatbus_tokens_out_total", (("model", "echo"),))] == 5
    assert metrics[("chatbus_active_chats", ())] == 0


async def test_refused_requests_are_counted_too(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(auth={"keys": {"k": {"tenant": "t", "sha256": digest("k")}}})
    async with chatbus.post("/chat/chat", {"query": "x"}) as response:
        assert response.status == 401
    async with chatbus.http.get(
        chatbus.url + "/metrics", headers={"Authorization": "Bearer k"}
    ) as r:
        text = await r.text()
    assert 'chatbus_requests_total{method="POST",route="/chat/chat",status="401"} 1.0' in text
