"""OpenAI's Chat Completions format (plugins/transports/openai/), read by the official SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionContentPartTextParam,
    ChatCompletionMessageParam,
    ChatCompletionUserMessageParam,
)

from chatbus.testing.fake_upstream import Behaviour, FakeUpstream
from core.auth import digest
from core.events import ChatCompleted
from core.history import Status, StoreUnavailable
from core.providers import Usage
from tests.conftest import Chatbus, StartChatbus

pytestmark = pytest.mark.both_stores  # every test that starts a chatbus: SQLite and MongoDB

USER: ChatCompletionUserMessageParam = {"role": "user", "content": "one two three"}


@pytest.fixture
async def client(chatbus: Chatbus) -> AsyncIterator[AsyncOpenAI]:
    # No SDK retries: each retry would be a chat of its own.
    async with AsyncOpenAI(base_url=chatbus.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def raw_stream(chatbus: Chatbus, body: dict[str, Any]) -> list[Any]:
    """POST a streamed request and return every `data:` payload ("[DONE]" as is)."""
    async with chatbus.post("/v1/chat/completions", {"stream": True, **body}) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        raw = (await response.read()).decode()
    assert raw.endswith("\n\n")
    frames = [frame for frame in raw.split("\n\n") if frame and not frame.startswith(":")]
    assert all(frame.startswith("data: ") for frame in frames)
    return [json.loads(f[6:]) if f != "data: [DONE]" else "[DONE]" for f in frames]


async def test_not_streamed(chatbus: Chatbus, client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="echo", messages=[USER])
    assert completion.object == "chat.completion"
    assert completion.model == "echo"
    (choice,) = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", "one two three")
    assert choice.finish_reason == "stop"
    extra = completion.model_extra or {}
    message_id = extra["chatbus"]["message_id"]
    assert completion.id == "chatcmpl-" + message_id
    assert extra["chatbus"]["conversation_id"] == ""
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)
    assert completion.usage.total_tokens == 6
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.status, record.query, record.response) == (
        Status.COMPLETED,
        "one two three",
        "one two three",
    )


async def test_streamed(client: AsyncOpenAI) -> None:
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="echo",
            messages=[USER],
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    first, *deltas, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in deltas) == "one two three"
    assert [chunk.choices[0].finish_reason for chunk in deltas] == [None] * 3
    assert finish.choices[0].finish_reason == "stop"
    assert finish.choices[0].delta.content is None
    assert usage.choices == []
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (3, 3)
    assert {chunk.id for chunk in chunks} == {first.id}
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk.model for chunk in chunks} == {"echo"}


async def test_stream_frames_on_the_wire(chatbus: Chatbus) -> None:
    frames = await raw_stream(chatbus, {"model": "echo", "messages": [USER]})
    assert frames[-1] == "[DONE]"
    assert [frame["choices"][0]["delta"] for frame in frames[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "one "},
        {"content": "two "},
        {"content": "three"},
        {},
    ]
    assert all("usage" not in frame for frame in frames[:-1])  # not asked for


async def test_what_the_upstream_receives(client: AsyncOpenAI, upstream: FakeUpstream) -> None:
    history: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi {{ there }}"},
        {"role": "assistant", "content": "Hello."},
    ]
    await client.chat.completions.create(
        model="fake", messages=[*history, USER], temperature=0.2, max_tokens=7
    )
    sent = upstream.received[-1].body
    assert sent["messages"] == [*history, USER]
    assert (sent["temperature"], sent["max_tokens"], sent["model"]) == (0.2, 7, "fake-model")

    parts: list[ChatCompletionContentPartTextParam] = [
        {"type": "text", "text": "first"},
        {"type": "text", "text": "second"},
    ]
    await client.chat.completions.create(
        model="fake",
        messages=[{"role": "developer", "content": "Rules."}, {"role": "user", "content": parts}],
        max_completion_tokens=3,
    )
    sent = upstream.received[-1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "first\nsecond"},
    ]
    assert sent["max_tokens"] == 3
    assert "temperature" not in sent  # absent means absent: the upstream's default


async def test_stored_history_with_extra_body(client: AsyncOpenAI, upstream: FakeUpstream) -> None:
    extra = {"conversation_id": "c1", "history_len": 5}
    for query in ("first", "second"):
        answer = await client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": query}], extra_body=extra
        )
        assert (answer.model_extra or {})["chatbus"]["conversation_id"] == "c1"
    answer = await client.chat.completions.create(model="fake", messages=[USER], extra_body=extra)
    assert upstream.received[-1].body["messages"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "second"},
        USER,
    ]
    # A system (or developer) message is an instruction: the stored turns follow it.
    last_turn = [USER, {"role": "assistant", "content": answer.choices[0].message.content}]
    system: ChatCompletionMessageParam = {"role": "system", "content": "S"}
    developer: ChatCompletionMessageParam = {"role": "developer", "content": "S"}
    for first in (system, developer):
        await client.chat.completions.create(
            model="fake", messages=[first, USER], extra_body={**extra, "history_len": 1}
        )
        assert upstream.received[-1].body["messages"] == [system, *last_turn, USER]
    # Earlier user or assistant messages are the history: the stored turns are not read.
    mine: list[ChatCompletionMessageParam] = [
        system,
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    await client.chat.completions.create(model="fake", messages=[*mine, USER], extra_body=extra)
    assert upstream.received[-1].body["messages"] == [*mine, USER]


async def test_a_conversation_id_alone_reads_the_default_history_len(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    """#16.4: on /v1 a conversation remembers without history_len ([chat]
    default_history_len turns); /chat/chat keeps chatchat's -1 (none)."""
    chatbus = await start_chatbus(chat={"default_history_len": 2})
    ask = {"conversation_id": "c-default"}
    async with AsyncOpenAI(base_url=chatbus.url + "/v1", api_key="-", max_retries=0) as client:
        for query in ("one", "two", "three"):
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": query}], extra_body=ask
            )
        await client.chat.completions.create(model="fake", messages=[USER], extra_body=ask)
    assert upstream.received[-1].body["messages"] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "three"},
        USER,
    ]
    await chatbus.chat(query="and chatchat?", model_name="fake", conversation_id="c-default")
    assert upstream.received[-1].body["messages"] == [{"role": "user", "content": "and chatchat?"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [USER, {"role": "assistant", "content": "x"}]}, "messages"),
        ({"messages": [USER], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages.0.content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [USER], "n": 2}, "n"),
        ({"messages": [USER], "logprobs": True}, "logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
        ({"messages": [USER], "extra_body": {"prompt_name": "nope"}}, "prompt_name"),
    ],
)
async def test_bad_requests(
    chatbus: Chatbus, client: AsyncOpenAI, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="echo", **body)
    error = caught.value
    assert error.status_code == 400
    assert error.param == param
    assert isinstance(error.body, dict)
    assert error.body["type"] == "invalid_request_error"
    assert error.body["code"] in ("validation_error", "unknown_prompt")
    assert error.body["message"]
    assert chatbus.events.events == []  # nothing stored, nothing published


async def test_invalid_json(chatbus: Chatbus) -> None:
    url, headers = chatbus.url + "/v1/chat/completions", {"Content-Type": "application/json"}
    async with chatbus.http.post(url, data=b"{", headers=headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_json",
        None,
    )


async def test_unknown_model_is_a_404(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-9", messages=[USER])
    assert caught.value.status_code == 404
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")
    assert "echo, fake" in caught.value.message


async def test_store_unavailable_is_a_503(
    chatbus: Chatbus, client: AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*args: Any) -> None:
        raise StoreUnavailable("switched off by the test")

    monkeypatch.setattr(chatbus.store, "add_message", down)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="echo", messages=[USER])
    assert caught.value.status_code == 503
    assert caught.value.type == "api_error"
    assert caught.value.code == "store_unavailable"


async def test_upstream_failure_not_streamed_is_a_502(
    chatbus: Chatbus, client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.fail_status = 500
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="fake", messages=[USER])
    assert caught.value.status_code == 502
    assert isinstance(caught.value.body, dict)
    assert (caught.value.body["type"], caught.value.body["code"]) == (
        "api_error",
        "upstream_unavailable",
    )
    message_id = caught.value.response.json()["chatbus"]["message_id"]
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None and record.status is Status.FAILED


async def test_an_sdk_does_not_retry_a_failed_turn(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.fail_status = 500
    # The SDK's defaults: it would retry a 502 twice, each try a turn of its own.
    async with AsyncOpenAI(base_url=chatbus.url + "/v1", api_key="unused") as sdk:
        assert sdk.max_retries == 2
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(
                model="fake", messages=[USER], extra_body={"conversation_id": "c-retry"}
            )
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    turns = await chatbus.store.messages("default", "c-retry", limit=10, offset=0)
    assert [turn.status for turn in turns] == [Status.FAILED]


async def test_upstream_breaks_mid_stream(
    chatbus: Chatbus, client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.break_after = 2
    text = ""
    with pytest.raises(openai.APIError) as caught:
        stream = await client.chat.completions.create(model="fake", messages=[USER], stream=True)
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == "Hello from"
    assert caught.value.code == "upstream_unavailable"

    *answer, error, done = await raw_stream(chatbus, {"model": "fake", "messages": [USER]})
    assert "".join(frame["choices"][0]["delta"]["content"] for frame in answer) == "Hello from"
    assert set(error) == {"error"}
    assert (error["error"]["type"], error["error"]["code"]) == ("api_error", "upstream_unavailable")
    assert done == "[DONE]"
    message_id = answer[0]["id"].removeprefix("chatcmpl-")
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.status, record.response) == (Status.FAILED, "Hello from")


async def test_models(client: AsyncOpenAI) -> None:
    models = [model async for model in client.models.list()]
    assert [model.id for model in models] == ["echo", "fake"]
    assert {(model.object, model.owned_by) for model in models} == {("model", "chatbus")}


async def test_the_turn_is_recorded_and_published(chatbus: Chatbus, client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="echo", messages=[USER], stream=True, extra_body={"conversation_id": "c9"}
    )
    chunks = [chunk async for chunk in stream]
    message_id = chunks[0].id.removeprefix("chatcmpl-")
    (event,) = await chatbus.events.wait_for("chat_completed")
    assert isinstance(event, ChatCompleted)
    assert (event.message_id, event.conversation_id, event.model) == (message_id, "c9", "echo")
    assert event.text == "one two three"
    assert [e.hook for e in chatbus.events.events] == [
        "chat_received",
        "chat_started",
        "chat_completed",
    ]
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.conversation_id, record.status, record.response) == (
        "c9",
        Status.COMPLETED,
        "one two three",
    )
    assert record.usage is not None and record.usage.completion_tokens == 3


async def test_client_disconnect_cancels_the_upstream(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = [f"t{i} " for i in range(100)]
    upstream.behaviour.delay = 0.05
    body = {"model": "fake", "messages": [USER], "stream": True}
    response = await chatbus.http.post(chatbus.url + "/v1/chat/completions", json=body)
    for _ in range(4):  # the role chunk and three deltas
        await response.content.readuntil(b"\n\n")
    response.close()  # the client goes away mid-answer
    assert await upstream.wait_for_close(1.0), "the upstream request was not cancelled in 1 s"
    (cancelled,) = await chatbus.events.wait_for("chat_cancelled")
    record = await chatbus.store.get_message("default", cancelled.message_id)
    assert record is not None
    assert record.status is Status.CANCELLED
    assert record.response.startswith("t0 t1 t2 ")
    assert chatbus.events.of("chat_completed") == []


async def test_the_api_key_names_the_tenant(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(auth={"keys": {"k": {"tenant": "acme", "sha256": digest("k")}}})
    url = chatbus.url + "/v1"
    async with AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as client:
        answer = await client.chat.completions.create(model="echo", messages=[USER])
    message_id = (answer.model_extra or {})["chatbus"]["message_id"]
    assert await chatbus.store.get_message("acme", message_id) is not None
    assert await chatbus.store.get_message("default", message_id) is None
    async with AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="echo", messages=[USER])
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    # Raised before the route's handler runs, yet in OpenAI's shape, as every /v1 error.
    assert caught.value.body == {
        "message": "a valid API key is required: Authorization: Bearer <key>",
        "type": "invalid_request_error",
        "param": None,
        "code": "unauthorized",
    }


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/embeddings", 404, "not_found"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ],
)
async def test_errors_outside_the_routes_are_in_openai_s_shape(
    chatbus: Chatbus, method: str, path: str, status: int, code: str
) -> None:
    async with chatbus.http.request(method, chatbus.url + path) as response:
        assert response.status == status
        body = await response.json()
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 405:
        assert response.headers["Allow"] == "POST"
    # chatbus's own routes keep chatbus's shape.
    async with chatbus.http.get(chatbus.url + "/no-such-path") as response:
        assert (await response.json()) == {
            "error": {"type": "not_found", "message": "Not Found"},
            "code": 404,
            "msg": "Not Found",
        }


# --- the answer's limits, and the upstream's usage ------------------------------------------


async def test_an_endless_answer_stops_at_its_size_limit(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour = Behaviour(endless=True, tokens=["w0 ", "w1 "])
    chatbus = await start_chatbus(models={"fake": {"max_answer_chars": 1000}})
    async with asyncio.timeout(30):
        _, *answer, error, done = await raw_stream(chatbus, {"model": "fake", "messages": [USER]})
    text = "".join(frame["choices"][0]["delta"]["content"] for frame in answer)
    assert text == "w0 w1 " * 166 + "w0 "
    assert error["error"]["code"] == "answer_too_long"
    assert done == "[DONE]"
    message_id = answer[0]["id"].removeprefix("chatcmpl-")
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.status, record.error, record.response) == (
        Status.FAILED,
        "answer_too_long",
        text,
    )
    (failed,) = await chatbus.events.wait_for("chat_failed")
    assert failed.error_type == "answer_too_long"  # type: ignore[attr-defined]

    async with (
        asyncio.timeout(30),
        chatbus.post("/v1/chat/completions", {"model": "fake", "messages": [USER]}) as response,
    ):
        assert response.status == 502
        body = await response.json()
    assert body["error"]["code"] == "answer_too_long"
    assert body["chatbus"]["text"] == text
    assert len(upstream.received) == 2


async def test_an_endless_answer_stops_at_its_time_limit(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour = Behaviour(endless=True, tokens=["w0 ", "w1 "], delay=0.02)
    chatbus = await start_chatbus(chat={"answer_timeout_seconds": 0.5})
    async with asyncio.timeout(30):
        *_, error, done = await raw_stream(chatbus, {"model": "fake", "messages": [USER]})
    assert (error["error"]["code"], done) == ("upstream_timeout", "[DONE]")
    (failed,) = await chatbus.events.wait_for("chat_failed")
    record = await chatbus.store.get_message("default", failed.message_id)
    assert record is not None
    assert (record.status, record.error) == (Status.FAILED, "upstream_timeout")


@pytest.mark.parametrize("bad", ["x", -1, 1e25, True, 2**60])
async def test_invalid_upstream_token_counts_are_not_sent_on(
    chatbus: Chatbus, client: AsyncOpenAI, upstream: FakeUpstream, bad: Any
) -> None:
    upstream.behaviour = Behaviour(usage_values={"prompt_tokens": bad, "completion_tokens": 4})
    completion = await client.chat.completions.create(model="fake", messages=[USER])
    assert completion.choices[0].message.content == "Hello from fake upstream"
    assert completion.usage is not None
    assert completion.usage.model_dump() == {
        "prompt_tokens": 0,  # unknown
        "completion_tokens": 4,
        "total_tokens": 4,
        "completion_tokens_details": None,
        "prompt_tokens_details": None,
    }
    frames = await raw_stream(
        chatbus,
        {"model": "fake", "messages": [USER], "stream_options": {"include_usage": True}},
    )
    assert frames[-2]["usage"] == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}
    message_id = frames[0]["id"].removeprefix("chatcmpl-")
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert record.usage == Usage(prompt_tokens=None, completion_tokens=4)
