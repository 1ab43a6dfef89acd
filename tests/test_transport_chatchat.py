"""The chatchat wire format of /chat/chat (plugins/transports/chatchat/chat.py), read by real
clients: a spec-minded SSE reader, and chatchat's own client (tests/chatchat_client.py)."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
import structlog

from chatbus.testing.fake_upstream import FakeUpstream
from core.history import Status
from tests.conftest import Chatbus, StartChatbus
from tests.waiting import wait_until

pytestmark = pytest.mark.both_stores  # every test that starts a chatbus: SQLite and MongoDB

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


async def test_stream_frames_are_chatchats_exactly(chatbus: Chatbus) -> None:
    async with chatbus.post("/chat/chat", {"query": "one two three", "stream": True}) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache"
        raw = (await r.read()).decode()
    frames = raw.split("\r\n\r\n")
    assert frames[-1] == ""  # the body ends on a frame boundary
    message_id = re.search(r'"message_id":"([0-9a-f]{32})"', raw).group(1)  # type: ignore[union-attr]
    assert frames[:-1] == [
        f'data: {{"text":"{word}","message_id":"{message_id}"}}'
        for word in ("one ", "two ", "three")
    ]


async def test_stream_parsed_by_an_sse_reader(chatbus: Chatbus) -> None:
    stream = await chatbus.chat(query="Hello, chatbus! ünïcødé 你好")
    assert stream.status == 200
    assert stream.content_type == "text/event-stream"
    assert stream.text == "Hello, chatbus! ünïcødé 你好"
    assert stream.other_lines == []  # no event:, id: or retry: lines
    assert [set(frame) for frame in stream.frames] == [{"text", "message_id"}] * 4
    (message_id,) = stream.message_ids
    assert HEX_ID.match(message_id)


async def test_not_streamed_is_one_json_body(chatbus: Chatbus) -> None:
    async with chatbus.post("/chat/chat", {"query": "whole answer"}) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert set(body) == {"text", "message_id"}
    assert body["text"] == "whole answer"
    assert HEX_ID.match(body["message_id"])


async def test_model_instead_of_model_name_is_said_in_a_log_line(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    """#16.6: `model` (OpenAI's name) is not chatchat's field: the default model answers, and
    the log says why."""
    with structlog.testing.capture_logs() as logs:
        status, body = await chatbus.chat_json(query="which model?", model="fake")
        named = await chatbus.chat_json(query="this one", model_name="fake", model="fake")
    assert (status, body["text"]) == (200, "which model?")  # echo, the default, answered
    assert (named[0], named[1]["text"]) == (200, "Hello from fake upstream")
    warned = [line for line in logs if "model_name" in line["event"]]
    assert warned == [
        {
            "event": "/chat/chat reads model_name, not model: the default model answers",
            "model": "fake",
            "default_model": "echo",
            "log_level": "warning",
        }
    ]


async def test_upstream_failure_before_streaming(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.fail_status = 429
    upstream.behaviour.retry_after = "0"
    stream = await chatbus.chat(query="x", model_name="fake")
    assert len(upstream.received) == 3  # retried twice (the default), then failed
    assert stream.status == 200
    (frame,) = stream.frames
    assert frame["text"] == ""
    assert frame["error"]["type"] == "rate_limited"
    assert "429" in frame["error"]["message"]
    record = await chatbus.store.get_message("default", frame["message_id"])
    assert record is not None
    assert (record.status, record.error, record.response) == (Status.FAILED, "rate_limited", "")


async def test_upstream_failure_not_streamed_is_a_502(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.fail_status = 500
    status, body = await chatbus.chat_json(query="x", model_name="fake")
    assert status == 502
    assert body["error"]["type"] == "upstream_unavailable"
    record = await chatbus.store.get_message("default", body["message_id"])
    assert record is not None and record.status is Status.FAILED


async def test_upstream_breaks_mid_stream(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.break_after = 2
    stream = await chatbus.chat(query="x", model_name="fake")
    *answer, last = stream.frames
    assert "".join(frame["text"] for frame in answer) == "Hello from"
    assert last["text"] == ""
    assert last["error"]["type"] == "upstream_unavailable"
    record = await chatbus.store.get_message("default", last["message_id"])
    assert record is not None
    assert (record.status, record.response) == (Status.FAILED, "Hello from")


async def test_malformed_upstream_stream(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.malformed_after = 1
    stream = await chatbus.chat(query="x", model_name="fake")
    assert stream.frames[-1]["error"]["type"] == "malformed_response"
    assert stream.text == "Hello"


async def test_upstream_unreachable(start_chatbus: StartChatbus) -> None:
    unreachable = {
        "provider": "openai_compat",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "m",
        "retry_backoff": 0.01,
    }
    chatbus = await start_chatbus(models={"down": unreachable})
    stream = await chatbus.chat(query="x", model_name="down")
    assert stream.frames[-1]["error"]["type"] == "upstream_unavailable"
    assert "cannot connect" in stream.frames[-1]["error"]["message"]


async def test_keep_alive_comments_while_the_model_is_silent(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(chat={"keepalive_seconds": 0.1})
    upstream.behaviour.first_delay = 0.45
    stream = await chatbus.chat(query="x", model_name="fake")
    assert stream.comments.count("ping") >= 2
    assert stream.text == "Hello from fake upstream"


async def read_frames(response: aiohttp.ClientResponse, count: int) -> str:
    text = ""
    for _ in range(count):
        line = await response.content.readline()
        while line.strip() == b"":
            line = await response.content.readline()
        text += json.loads(line[5:])["text"]
    return text


async def test_client_disconnect_cancels_the_upstream_and_keeps_the_partial_answer(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = [f"t{i} " for i in range(100)]
    upstream.behaviour.delay = 0.05
    response = await chatbus.http.post(
        chatbus.url + "/chat/chat", json={"query": "x", "model_name": "fake", "stream": True}
    )
    seen = await read_frames(response, 3)
    response.close()  # the client goes away mid-answer
    assert await upstream.wait_for_close(1.0), "the upstream request was not cancelled in 1 s"
    (cancelled,) = await chatbus.events.wait_for("chat_cancelled")
    record = await chatbus.store.get_message("default", cancelled.message_id)
    assert record is not None
    assert record.status is Status.CANCELLED
    assert record.response.startswith(seen)
    assert len(record.response) < len("".join(upstream.behaviour.tokens))
    assert cancelled.text == record.response  # type: ignore[attr-defined]
    assert chatbus.events.of("chat_completed") == []


async def test_disconnect_before_the_first_token(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.first_delay = 5
    response = await chatbus.http.post(
        chatbus.url + "/chat/chat", json={"query": "x", "model_name": "fake", "stream": True}
    )
    await wait_until(lambda: upstream.received, "the request at the upstream")
    response.close()
    assert await upstream.wait_for_close(1.0)
    (cancelled,) = await chatbus.events.wait_for("chat_cancelled")
    record = await chatbus.store.get_message("default", cancelled.message_id)
    assert record is not None
    assert (record.status, record.response) == (Status.CANCELLED, "")


async def test_disconnect_while_not_streamed(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.tokens = [f"t{i} " for i in range(100)]
    upstream.behaviour.delay = 0.05
    task = asyncio.create_task(chatbus.chat_json(query="x", model_name="fake"))
    await wait_until(lambda: upstream.pieces_sent >= 4, "four pieces streamed")
    task.cancel()
    assert await upstream.wait_for_close(1.0)
    (cancelled,) = await chatbus.events.wait_for("chat_cancelled")
    record = await chatbus.store.get_message("default", cancelled.message_id)
    assert record is not None and record.status is Status.CANCELLED
    assert record.response.startswith("t0 t1 ")


async def test_shutdown_lets_answers_in_flight_finish(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(models={"echo": {"provider": "echo", "delay": 0.05}})
    query = " ".join(f"w{i}" for i in range(10))
    answer = asyncio.create_task(chatbus.chat(query=query))
    await chatbus.events.wait_for("chat_started")  # the answer is under way
    await chatbus.runner.cleanup()  # what SIGTERM does: stop accepting, finish, close
    stream = await answer
    assert stream.text == query
    assert "error" not in stream.frames[-1]
    with pytest.raises(aiohttp.ClientConnectionError):
        await chatbus.chat(query="too late")
