"""Every part of an answer through /v1/chat/completions, read by the official openai SDK:
tool calls, reasoning, finish reasons, usage details, and every request field passed on
(provider contract v2, #14). The fake upstream plays the model, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from chatbus.testing.fake_upstream import FakeUpstream
from core.events import ChatCompleted
from core.history import Status
from tests.conftest import Chatbus, StartChatbus

pytestmark = pytest.mark.both_stores

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ASK: ChatCompletionMessageParam = {"role": "user", "content": "Weather in Paris?"}
CALL = {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.fixture
async def client(chatbus: Chatbus) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=chatbus.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


async def test_a_tool_round_trip_not_streamed(
    chatbus: Chatbus, client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = []
    upstream.behaviour.tool_calls = [CALL]
    first = await client.chat.completions.create(model="fake", messages=[ASK], tools=[WEATHER])
    assert upstream.received[-1].body["tools"] == [WEATHER]
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (call.id, call.type) == ("call_fake0", "function")
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )

    # The tool's result goes back with the assistant's call; the model answers in text.
    upstream.behaviour.tool_calls = None
    upstream.behaviour.tokens = ["Sunny", " in Paris"]
    calls: list[Any] = [call.model_dump()]
    follow_up: list[ChatCompletionMessageParam] = [
        ASK,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
    ]
    second = await client.chat.completions.create(model="fake", messages=follow_up, tools=[WEATHER])
    assert upstream.received[-1].body["messages"] == [
        ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fake0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake0", "content": '{"sky": "clear"}'},
    ]
    assert second.choices[0].message.content == "Sunny in Paris"
    assert second.choices[0].finish_reason == "stop"
    record = await chatbus.store.get_message("default", first.id.removeprefix("chatcmpl-"))
    assert record is not None and record.status is Status.COMPLETED


async def test_streamed_tool_calls_accumulate_in_the_sdk_helpers(
    client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = ["Let me look."]
    upstream.behaviour.tool_calls = [CALL, {"name": "get_time", "arguments": '{"tz": "CET"}'}]
    async with client.beta.chat.completions.stream(
        model="fake", messages=[ASK], tools=[WEATHER]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    calls = [
        (c.id, c.function.name, c.function.arguments)
        for c in choice.message.tool_calls or []
        if isinstance(c, ChatCompletionMessageFunctionToolCall)
    ]
    assert calls == [
        ("call_fake0", "get_weather", '{"city": "Paris"}'),
        ("call_fake1", "get_time", '{"tz": "CET"}'),
    ]


async def test_streamed_tool_call_deltas_are_to_spec(
    client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = []
    upstream.behaviour.tool_calls = [CALL]
    stream = await client.chat.completions.create(
        model="fake", messages=[ASK], tools=[WEATHER], stream=True
    )
    deltas = [chunk.choices[0].delta.tool_calls async for chunk in stream if chunk.choices]
    pieces = [call for delta in deltas if delta for call in delta]
    assert all(piece.index == 0 for piece in pieces)  # on every delta
    assert pieces[0].id == "call_fake0" and pieces[0].function is not None
    assert pieces[0].function.name == "get_weather"
    assert all(piece.id is None and piece.function.name is None for piece in pieces[1:])  # type: ignore[union-attr]
    assert "".join(p.function.arguments or "" for p in pieces) == CALL["arguments"]  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
async def test_finish_reason_length(
    client: AsyncOpenAI, upstream: FakeUpstream, stream: bool
) -> None:
    if stream:
        chunks = await client.chat.completions.create(
            model="fake", messages=[ASK], max_tokens=2, stream=True
        )
        reasons = [c.choices[0].finish_reason async for c in chunks if c.choices]
        assert reasons[-1] == "length"
    else:
        answer = await client.chat.completions.create(model="fake", messages=[ASK], max_tokens=2)
        assert answer.choices[0].finish_reason == "length"
        assert answer.choices[0].message.content == "Hello from"


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_reaches_the_client_under_both_names(
    client: AsyncOpenAI, upstream: FakeUpstream, field: str
) -> None:
    upstream.behaviour.reasoning = ["Think", "ing..."]
    upstream.behaviour.reasoning_field = field
    answer = await client.chat.completions.create(model="fake", messages=[ASK])
    extra = answer.choices[0].message.model_extra or {}
    assert (extra["reasoning_content"], extra["reasoning"]) == ("Thinking...", "Thinking...")
    assert answer.choices[0].message.content == "Hello from fake upstream"  # no reasoning

    stream = await client.chat.completions.create(model="fake", messages=[ASK], stream=True)
    thought, text = "", ""
    async for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            thought += (delta.model_extra or {}).get("reasoning_content") or ""
            text += delta.content or ""
    assert (thought, text) == ("Thinking...", "Hello from fake upstream")


async def test_usage_details_reach_the_client(client: AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.behaviour.usage_values = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 3},
    }
    stream = await client.chat.completions.create(
        model="fake", messages=[ASK], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (10, 5)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 4
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 3


PASSED_THROUGH: dict[str, Any] = {
    "temperature": 0.3,
    "top_p": 0.9,
    "stop": ["\n\n", "END"],
    "seed": 42,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"1234": -100},
    "user": "user-7",
    "tools": [WEATHER],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", sorted(PASSED_THROUGH))
async def test_each_field_arrives_at_the_upstream_as_sent(
    client: AsyncOpenAI, upstream: FakeUpstream, name: str, stream: bool
) -> None:
    value = PASSED_THROUGH[name]
    response = await client.chat.completions.create(
        model="fake", messages=[ASK], stream=stream, **{name: value}
    )
    if stream:
        async for _ in response:  # type: ignore[union-attr]
            pass
    assert upstream.received[-1].body[name] == value


async def test_other_fields_pass_through_and_json_object(
    client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await client.chat.completions.create(
        model="fake",
        messages=[ASK],
        response_format={"type": "json_object"},
        max_completion_tokens=9,
        extra_body={"top_k": 20, "reasoning_effort": "low"},
    )
    sent = upstream.received[-1].body
    assert sent["response_format"] == {"type": "json_object"}
    assert (sent["top_k"], sent["reasoning_effort"], sent["max_tokens"]) == (20, "low", 9)
    assert "temperature" not in sent and "n" not in sent


async def test_image_parts_reach_the_provider(client: AsyncOpenAI, upstream: FakeUpstream) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts: Any = [{"type": "text", "text": "What is this?"}, image]
    await client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": parts}]
    )
    assert upstream.received[-1].body["messages"] == [{"role": "user", "content": parts}]


async def test_get_one_model(client: AsyncOpenAI) -> None:
    model = await client.models.retrieve("fake")
    assert (model.id, model.object, model.owned_by) == ("fake", "model", "chatbus")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("gpt-9")
    assert caught.value.code == "model_not_found"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "invalid_request_error"


async def test_the_end_event_carries_finish_reason_and_tool_calls(
    chatbus: Chatbus, client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tool_calls = [CALL]
    await client.chat.completions.create(model="fake", messages=[ASK], tools=[WEATHER])
    (event,) = await chatbus.events.wait_for("chat_completed")
    assert isinstance(event, ChatCompleted)
    assert event.finish_reason == "tool_calls"
    assert [call["function"] for call in event.tool_calls] == [CALL]


async def test_chatchat_frames_stay_text_only(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    plain = await chatbus.chat(query="hi", model_name="fake")
    upstream.behaviour.reasoning = ["secret ", "thoughts"]
    thinking = await chatbus.chat(query="hi", model_name="fake")
    assert [set(frame) for frame in thinking.frames] == [set(frame) for frame in plain.frames]
    assert thinking.text == plain.text == "Hello from fake upstream"
    assert "secret" not in json.dumps(thinking.frames)
    status, body = await chatbus.chat_json(query="hi", model_name="fake")
    assert (status, body["text"]) == (200, "Hello from fake upstream")


async def test_reasoning_counts_toward_the_size_limit(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(models={"fake": {"max_answer_chars": 100}})
    upstream.behaviour.reasoning = ["x" * 60, "y" * 60]
    status, body = await chatbus.chat_json(query="hi", model_name="fake")
    assert status == 502 and body["error"]["type"] == "answer_too_long"


async def test_the_stored_turn_holds_the_whole_answer(
    chatbus: Chatbus, client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.behaviour.reasoning = ["Hm."]
    upstream.behaviour.tool_calls = [CALL]
    await client.chat.completions.create(
        model="fake", messages=[ASK], tools=[WEATHER], extra_body={"conversation_id": "agent"}
    )
    url = chatbus.url + "/conversations/agent/messages"
    async with chatbus.http.get(url) as response:
        (message,) = (await response.json())["messages"]
    assert message["response"] == "Hello from fake upstream"  # no reasoning in the text
    assert (message["finish_reason"], message["reasoning"]) == ("tool_calls", "Hm.")
    assert message["tool_calls"] == [{"id": "call_fake0", "type": "function", "function": CALL}]


async def test_an_agent_loop_runs_on_server_side_memory(
    client: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """Only the new messages each time: the stored turns replay the assistant's tool calls and
    the tool's results in order (conversation_id and history_len, chatbus's extra fields)."""
    memory = {"conversation_id": "agent-1", "history_len": 10}
    upstream.behaviour.tokens = []
    upstream.behaviour.tool_calls = [CALL]
    first = await client.chat.completions.create(
        model="fake", messages=[ASK], tools=[WEATHER], extra_body=memory
    )
    (call,) = first.choices[0].message.tool_calls or []

    upstream.behaviour.tool_calls = None
    upstream.behaviour.tokens = ["Sunny", " in Paris"]
    result: ChatCompletionMessageParam = {
        "role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'
    }  # fmt: skip
    second = await client.chat.completions.create(
        model="fake", messages=[result], tools=[WEATHER], extra_body=memory
    )
    assert second.choices[0].message.content == "Sunny in Paris"
    called = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call.id, "type": "function", "function": CALL}],
    }
    assert upstream.received[-1].body["messages"] == [ASK, called, result]

    upstream.behaviour.tokens = ["Take a hat."]
    again: ChatCompletionMessageParam = {"role": "user", "content": "What should I wear?"}
    await client.chat.completions.create(model="fake", messages=[again], extra_body=memory)
    answered = {"role": "assistant", "content": "Sunny in Paris"}
    assert upstream.received[-1].body["messages"] == [ASK, called, result, answered, again]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
async def test_litellm_as_a_client_gets_tool_calls_and_the_finish_reason(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    from plugins.providers.litellm import close_shared_session, load_litellm

    litellm = await load_litellm()
    upstream.behaviour.tokens = []
    upstream.behaviour.tool_calls = [CALL]
    try:
        response = await litellm.acompletion(
            model="openai/fake",
            api_base=chatbus.url + "/v1",
            api_key="unused",
            messages=[ASK],
            tools=[WEATHER],
            stream=True,
            num_retries=0,
        )
        chunks = [chunk async for chunk in response]
    finally:
        await close_shared_session()
    whole = litellm.stream_chunk_builder(chunks, messages=[ASK])
    (choice,) = whole.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert upstream.received[-1].body["tools"] == [WEATHER]
