"""The flow of one chat (core/chat.py), driven over HTTP: models, prompts, history,
validation, what reaches the upstream, and the lifecycle events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from chatbus.testing.fake_upstream import Behaviour, FakeUpstream
from core.chat import Caller
from core.chat_input import ChatInput
from core.events import ChatCompleted, ChatReceived, ChatStarted
from core.history import MessageRecord, Status
from core.hookspecs import hookimpl
from core.keys import SERVICE
from core.providers import Usage
from tests.conftest import Chatbus, StartChatbus, webhook_settings
from tests.waiting import wait_until


def stored_rows(chatbus: Chatbus) -> list[tuple[Any, ...]]:
    path = chatbus.store.path  # type: ignore[attr-defined]
    with sqlite3.connect(path) as db:
        return db.execute("SELECT query, response, status FROM messages ORDER BY seq").fetchall()


async def test_what_the_upstream_receives(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    stream = await chatbus.chat(query="Hi", model_name="fake", temperature=0.2, max_tokens=50)
    assert stream.text == "Hello from fake upstream"
    body = upstream.received[-1].body
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 50
    assert body["model"] == "fake-model"
    assert body["stream"] is True


@pytest.mark.parametrize("max_tokens", [None, 0, -1])
async def test_null_or_non_positive_max_tokens_is_not_sent(
    chatbus: Chatbus, upstream: FakeUpstream, max_tokens: int | None
) -> None:
    await chatbus.chat(query="Hi", model_name="fake", max_tokens=max_tokens)
    body = upstream.received[-1].body
    assert "max_tokens" not in body
    assert body["temperature"] == 0.7


async def test_default_model_and_completed_record(chatbus: Chatbus) -> None:
    stream = await chatbus.chat(query="one two three", conversation_id="c1")
    (message_id,) = stream.message_ids
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.model, record.query, record.response) == ("echo", "one two three", stream.text)
    assert record.status is Status.COMPLETED
    assert record.conversation_id == "c1"
    assert record.usage is not None and record.usage.completion_tokens == 3
    assert record.latency is not None and record.latency >= 0


async def test_unknown_model_and_prompt_name_the_valid_ones(chatbus: Chatbus) -> None:
    status, body = await chatbus.chat_json(query="x", model_name="gpt-nope")
    assert status == 400
    assert body["error"]["type"] == "unknown_model"
    assert body["error"]["field"] == "model_name"
    assert "echo, fake" in body["error"]["message"]
    status, body = await chatbus.chat_json(query="x", prompt_name="nope", stream=True)
    assert status == 400
    assert body["error"]["field"] == "prompt_name"
    assert "default, py" in body["error"]["message"]
    assert stored_rows(chatbus) == []
    assert chatbus.events.events == []


async def test_prompt_template_applies_to_the_query(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    await chatbus.chat(query="sort a list", model_name="fake", prompt_name="py")
    assert upstream.received[-1].body["messages"][-1]["content"] == "Code: sort a list"


JSON = {"Content-Type": "application/json"}
BRACES = "{{ 7*7 }} {% if x %}y{% endif %} {# c #} }} {{"


async def test_braces_in_query_and_history_are_literal(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    history = [
        {"role": "user", "content": BRACES},
        {"role": "assistant", "content": "{{ input }}"},
    ]
    stream = await chatbus.chat(query=BRACES, model_name="fake", history=history)
    assert stream.frames
    sent = upstream.received[-1].body["messages"]
    assert sent == [*history, {"role": "user", "content": BRACES}]
    # And through a template with text around the input, too.
    await chatbus.chat(query=BRACES, model_name="fake", prompt_name="py")
    assert upstream.received[-1].body["messages"][-1]["content"] == f"Code: {BRACES}"


async def test_echo_answers_with_braces_unchanged(chatbus: Chatbus) -> None:
    assert (await chatbus.chat(query=BRACES)).text == BRACES


async def ask_three(chatbus: Chatbus, conversation: str = "conv") -> None:
    for query in ("first", "second", "third"):
        await chatbus.chat(query=query, conversation_id=conversation)


async def test_history_len_reads_the_last_turns_oldest_first(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    await ask_three(chatbus)
    await chatbus.chat(query="now", model_name="fake", conversation_id="conv", history_len=2)
    assert upstream.received[-1].body["messages"] == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "third"},
        {"role": "user", "content": "now"},
    ]


async def test_history_as_an_integer_reads_that_many_turns(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    await ask_three(chatbus)
    await chatbus.chat(query="now", model_name="fake", conversation_id="conv", history=1)
    assert upstream.received[-1].body["messages"] == [
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "third"},
        {"role": "user", "content": "now"},
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"conversation_id": "conv"},  # history_len defaults to -1
        {"conversation_id": "conv", "history_len": 0},
        {"conversation_id": "", "history_len": 5},  # "" reads nothing
        {"conversation_id": "other", "history_len": 5},
        {"conversation_id": "conv", "history": 0},
    ],
)
async def test_no_history_read(
    chatbus: Chatbus, upstream: FakeUpstream, body: dict[str, Any]
) -> None:
    await ask_three(chatbus)
    await chatbus.chat(query="now", model_name="fake", **body)
    assert upstream.received[-1].body["messages"] == [{"role": "user", "content": "now"}]


async def test_an_explicit_history_list_wins_over_the_store(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    await ask_three(chatbus)
    given = [
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "mine"},
        {"role": "assistant", "content": "yours"},
    ]
    await chatbus.chat(
        query="now", model_name="fake", conversation_id="conv", history_len=5, history=given
    )
    assert upstream.received[-1].body["messages"] == [*given, {"role": "user", "content": "now"}]
    started = chatbus.events.of("chat_started")[-1]
    assert started.history_turns == 1  # type: ignore[attr-defined]


async def test_system_messages_alone_are_instructions_before_the_stored_turns(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    await ask_three(chatbus)
    given = [{"role": "system", "content": "be terse"}, {"role": "system", "content": "in French"}]
    await chatbus.chat(
        query="now", model_name="fake", conversation_id="conv", history_len=2, history=given
    )
    assert upstream.received[-1].body["messages"] == [
        *given,
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "third"},
        {"role": "user", "content": "now"},
    ]
    started = chatbus.events.of("chat_started")[-1]
    assert started.history_turns == 2  # type: ignore[attr-defined]
    # Without a number of turns to read, they are the whole history.
    await chatbus.chat(query="again", model_name="fake", conversation_id="conv", history=given)
    assert upstream.received[-1].body["messages"] == [
        *given,
        {"role": "user", "content": "again"},
    ]


async def test_turns_without_an_answer_are_skipped(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    await chatbus.chat(query="kept", conversation_id="conv")
    upstream.behaviour.fail_status = 500
    failed = await chatbus.chat(query="failed", model_name="fake", conversation_id="conv")
    assert failed.frames[-1]["error"]["type"] == "upstream_unavailable"
    upstream.behaviour.fail_status = None
    upstream.behaviour.break_after = 2  # a partial answer, then a broken stream: failed too
    await chatbus.chat(query="broken", model_name="fake", conversation_id="conv")
    upstream.behaviour.break_after = None
    await chatbus.chat(query="now", model_name="fake", conversation_id="conv", history_len=10)
    assert upstream.received[-1].body["messages"] == [
        {"role": "user", "content": "kept"},
        {"role": "assistant", "content": "kept"},
        {"role": "user", "content": "now"},
    ]


async def test_history_is_capped_by_config(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(chat={"max_history_turns": 1})
    await ask_three(chatbus)
    await chatbus.chat(query="now", model_name="fake", conversation_id="conv", history=50)
    assert len(upstream.received[-1].body["messages"]) == 3


async def test_turns_in_the_same_second_keep_their_order(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    queries = [f"q{i}" for i in range(12)]
    for query in queries:  # all within well under a second
        await chatbus.chat(query=query, conversation_id="fast")
    await chatbus.chat(query="now", model_name="fake", conversation_id="fast", history_len=12)
    sent = upstream.received[-1].body["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == [*queries, "now"]


BAD_BODIES = [
    ({}, "query"),
    ({"query": ""}, "query"),
    ({"query": "   "}, "query"),
    ({"query": 5}, "query"),
    ({"query": "x", "temperature": 2.5}, "temperature"),
    ({"query": "x", "temperature": -0.1}, "temperature"),
    ({"query": "x", "temperature": "hot"}, "temperature"),
    ({"query": "x", "stream": "maybe"}, "stream"),
    ({"query": "x", "history": "yes"}, "history"),
    ({"query": "x", "history": True}, "history"),
    ({"query": "x", "history": [{"role": "robot", "content": "x"}]}, "history.0.role"),
    ({"query": "x", "history": [{"role": "user"}]}, "history.0.content"),
    ({"query": "x", "history_len": "many"}, "history_len"),
    ({"query": "x", "max_tokens": "lots"}, "max_tokens"),
    ({"query": "x", "model_name": 3}, "model_name"),
    ({"query": "x", "prompt_name": 7}, "prompt_name"),
    ({"query": "x", "conversation_id": ["a"]}, "conversation_id"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
@pytest.mark.parametrize("stream", [True, False])
async def test_bad_input_is_a_4xx_naming_the_field(
    chatbus: Chatbus, body: dict[str, Any], field: str, stream: bool
) -> None:
    async with chatbus.post("/chat/chat", {"stream": stream, **body}) as response:
        assert response.status == 422
        assert response.content_type == "application/json"
        error = (await response.json())["error"]
    assert error["type"] == "validation_error"
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")
    assert stored_rows(chatbus) == []
    assert chatbus.events.events == []


@pytest.mark.parametrize(
    ("raw", "status", "kind"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 422, "validation_error"),  # no body: every field's default, and query has none
        (b"[1, 2]", 422, "validation_error"),
        (b'"text"', 422, "validation_error"),
    ],
)
async def test_a_body_that_is_not_a_json_object(
    chatbus: Chatbus, raw: bytes, status: int, kind: str
) -> None:
    async with chatbus.http.post(chatbus.url + "/chat/chat", data=raw, headers=JSON) as response:
        assert response.status == status
        assert (await response.json())["error"]["type"] == kind
    assert stored_rows(chatbus) == []


async def test_query_length_limit(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(chat={"max_query_chars": 10})
    status, body = await chatbus.chat_json(query="x" * 11)
    assert status == 422
    assert body["error"]["field"] == "query"
    assert "at most 10" in body["error"]["message"]
    status, _ = await chatbus.chat_json(query="x" * 10)
    assert status == 200


async def test_body_size_limit(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(server={"max_body_bytes": 1024})
    status, body = await chatbus.chat_json(query="x" * 2000)
    assert status == 413
    assert body["error"]["type"] == "request_entity_too_large"
    assert stored_rows(chatbus) == []


async def test_extra_keys_from_other_chatchat_versions_are_ignored(chatbus: Chatbus) -> None:
    status, body = await chatbus.chat_json(query="hi", knowledge_base_name="kb", top_k=3)
    assert (status, body["text"]) == (200, "hi")


async def test_every_lifecycle_event_once_with_the_right_ids(chatbus: Chatbus) -> None:
    stream = await chatbus.chat(query="hello events", conversation_id="ev")
    (message_id,) = stream.message_ids
    await chatbus.events.wait_for("chat_completed")
    async with chatbus.post("/chat/feedback", {"message_id": message_id, "score": 90}) as r:
        assert r.status == 200
    await chatbus.events.wait_for("feedback_received")
    await chatbus.app[chatbus_service_key()].recorder.drain()
    hooks = [event.hook for event in chatbus.events.events]
    assert sorted(hooks) == sorted(
        ["chat_received", "chat_started", "chat_completed", "feedback_received"]
    )
    for event in chatbus.events.events:
        assert event.message_id == message_id
        assert event.conversation_id == "ev"
        assert event.tenant == "default"
    received, started, completed = (
        chatbus.events.of(h)[0] for h in ("chat_received", "chat_started", "chat_completed")
    )
    assert isinstance(received, ChatReceived) and received.stream is True
    assert isinstance(started, ChatStarted) and started.history_turns == 0
    assert isinstance(completed, ChatCompleted)
    assert completed.text == "hello events"
    assert completed.model == "echo"
    assert completed.query == "hello events"
    assert completed.usage is not None
    assert received.request_id == completed.request_id


def chatbus_service_key() -> Any:
    from core.keys import SERVICE

    return SERVICE


async def test_failed_chat_publishes_chat_failed(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.fail_status = 503
    stream = await chatbus.chat(query="x", model_name="fake")
    (failed,) = await chatbus.events.wait_for("chat_failed")
    assert failed.message_id in stream.message_ids
    assert failed.error_type == "upstream_unavailable"  # type: ignore[attr-defined]
    assert chatbus.events.of("chat_completed") == []


class Raising:
    @hookimpl
    def chat_started(self, event: Any) -> None:
        raise RuntimeError("subscriber bug")

    @hookimpl
    async def chat_completed(self, event: Any) -> None:
        raise RuntimeError("async subscriber bug")


class Hanging:
    def __init__(self) -> None:
        self.cut_off = asyncio.Event()

    @hookimpl
    async def chat_received(self, event: Any) -> None:
        try:
            await asyncio.sleep(60)  # a subscriber that hangs: the scenario, not a wait
        except asyncio.CancelledError:
            self.cut_off.set()
            raise


async def test_bad_subscribers_change_nothing_the_client_sees(
    start_chatbus: StartChatbus,
) -> None:
    hanging = Hanging()
    chatbus = await start_chatbus(Raising(), hanging, events={"timeout_seconds": 0.3})
    async with asyncio.timeout(2):  # the hanging subscriber does not hold the answer
        stream = await chatbus.chat(query="still fine")
        status, body = await chatbus.chat_json(query="still fine")
    assert stream.text == "still fine" and len(stream.frames) == 2
    assert (status, body["text"]) == (200, "still fine")
    # Other subscribers still got everything; the hanging one was cut off by the timeout.
    await chatbus.events.wait_for("chat_completed", 2)
    async with asyncio.timeout(2):
        await hanging.cut_off.wait()


class SystemPrompt:
    @hookimpl(wrapper=True)
    def prepare_messages(self, request: Any, messages: list[dict[str, str]]) -> Any:
        messages = yield
        return [{"role": "system", "content": f"model={request.model}"}, *messages]


async def test_prepare_messages_wrapper_edits_the_prompt(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(SystemPrompt())
    await chatbus.chat(query="hi", model_name="fake")
    assert upstream.received[-1].body["messages"] == [
        {"role": "system", "content": "model=fake"},
        {"role": "user", "content": "hi"},
    ]


class OddPieces:
    """A provider kind whose stream yields what docs/plugins.md says chatbus skips."""

    @hookimpl
    def register_providers(self, register: Any) -> None:
        register("odd", lambda spec, http: self)

    async def stream(self, call: Any) -> Any:
        yield ""  # skipped: not a first token
        yield None
        yield 42
        yield "a "
        await asyncio.sleep(0.01)  # a provider's pause between pieces, not a wait
        yield Usage(prompt_tokens=1, completion_tokens=2)
        yield b"bytes"
        yield "b"


async def test_a_provider_s_empty_and_foreign_pieces_are_skipped(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(OddPieces(), models={"odd": {"provider": "odd"}})
    stream = await chatbus.chat(query="q", model_name="odd")
    assert [frame["text"] for frame in stream.frames] == ["a ", "b"]
    (message_id,) = stream.message_ids
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.response, record.status) == ("a b", Status.COMPLETED)
    assert record.usage == Usage(prompt_tokens=1, completion_tokens=2)


# callback_url: the allowlist by host and port


@pytest.mark.parametrize(
    ("hosts", "url"),
    [
        (["hooks.example"], "http://hooks.example/h"),  # a bare host: the scheme's port
        (["hooks.example"], "https://hooks.example/h"),
        (["hooks.example"], "http://hooks.example:80/h"),
        (["HOOKS.example"], "http://hooks.EXAMPLE./h"),
        (["127.0.0.1:8080"], "http://127.0.0.1:8080/h"),
        (["127.0.0.1:8443"], "https://127.0.0.1:8443/h"),
        (["[::1]:9000"], "http://[::1]:9000/h"),
        (["[::1]"], "https://[::1]/h"),
    ],
)
async def test_a_callback_on_an_allowed_host_and_port_is_accepted(
    start_chatbus: StartChatbus, callback_secret: None, hosts: list[str], url: str
) -> None:
    chatbus = await start_chatbus(**webhook_settings(callback_hosts=hosts))
    status, body = await chatbus.chat_json(query="x", callback_url=url)
    assert status == 202, body


@pytest.mark.parametrize(
    ("hosts", "url", "problem"),
    [
        (["hooks.example"], "http://hooks.example:8080/h", "hooks.example:8080 is not allowed"),
        (["hooks.example"], "https://hooks.example:80/h", "hooks.example:80 is not allowed"),
        (["127.0.0.1:8080"], "http://127.0.0.1/h", "127.0.0.1:80 is not allowed"),
        (["127.0.0.1:8080"], "http://127.0.0.1:8081/h", "127.0.0.1:8081 is not allowed"),
        (["[::1]:9000"], "http://[::1]:9001/h", "[::1]:9001 is not allowed"),
        (["hooks.example"], "http://[a/", "not a valid URL"),
        (["hooks.example"], "http://hooks.example:99999/h", "its port is not valid"),
        (["hooks.example"], "http://hooks.example:abc/h", "its port is not valid"),
        (["hooks.example"], "http://hooks.example:0/h", "its port is not valid"),
        (["hooks.example"], "http://user:s3cretpw@hooks.example/h", "credentials"),
        (["hooks.example"], "http://user@hooks.example/h", "credentials"),
        (["hooks.example"], "http://hooks.example\\@evil.example/h", "credentials"),
        (["hooks.example"], "http:///h", "not an http(s) URL"),
    ],
)
async def test_a_callback_off_the_allowlist_is_a_400_naming_why(
    start_chatbus: StartChatbus, callback_secret: None, hosts: list[str], url: str, problem: str
) -> None:
    chatbus = await start_chatbus(**webhook_settings(callback_hosts=hosts))
    status, body = await chatbus.chat_json(query="x", callback_url=url)
    assert status == 400
    error = body["error"]
    assert (error["type"], error["field"]) == ("callback_not_allowed", "callback_url")
    assert problem in error["message"]
    assert "s3cretpw" not in error["message"]
    assert stored_rows(chatbus) == []
    assert chatbus.events.events == []


# --- the answer's limits (core/turn.py) ---------------------------------------------------

WORDS = [f"w{i} " for i in range(10)]  # 3 characters each


def endless(upstream: FakeUpstream, delay: float = 0.0) -> None:
    upstream.behaviour = Behaviour(endless=True, tokens=WORDS, delay=delay)


async def failed_record(chatbus: Chatbus, message_id: str) -> Any:
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert record.status is Status.FAILED
    return record


async def test_an_endless_answer_stops_at_its_size_limit(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    endless(upstream)
    chatbus = await start_chatbus(models={"fake": {"max_answer_chars": 1000}})
    async with asyncio.timeout(30):
        stream = await chatbus.chat(query="go on", model_name="fake")
    assert stream.frames[-1]["error"] == {
        "type": "answer_too_long",
        "message": "the answer passed the limit of 1000 characters",
    }
    assert stream.text == ("".join(WORDS) * 34)[:999]  # the piece that would pass it is not sent
    (message_id,) = stream.message_ids
    record = await failed_record(chatbus, message_id)
    assert (record.error, record.response) == ("answer_too_long", stream.text)
    (failed,) = await chatbus.events.wait_for("chat_failed")
    assert (failed.error_type, failed.text) == ("answer_too_long", stream.text)  # type: ignore[attr-defined]
    assert len(upstream.received) == 1  # not retried
    assert await upstream.wait_for_close(5.0)  # the upstream call was closed


async def test_the_size_limit_of_chat_and_of_a_model(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    endless(upstream)
    fake = {"provider": "openai_compat", "base_url": upstream.base_url, "model": "m"}
    chatbus = await start_chatbus(
        chat={"max_answer_chars": 300},
        models={"own": {**fake, "max_answer_chars": 600}},
    )
    async with asyncio.timeout(30):
        status, body = await chatbus.chat_json(query="go on", model_name="fake")  # [chat]'s
        assert (status, body["error"]["type"], len(body["text"])) == (502, "answer_too_long", 300)
        status, body = await chatbus.chat_json(query="go on", model_name="own")
        assert (status, body["error"]["type"], len(body["text"])) == (502, "answer_too_long", 600)
    record = await failed_record(chatbus, body["message_id"])
    assert (record.error, record.response) == ("answer_too_long", body["text"])


async def test_a_first_piece_past_the_limit_is_not_sent_and_falls_back(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    """Before the client has text the usual rule holds: the fallbacks are tried."""
    upstream.behaviour = Behaviour(tokens=["x" * 2000])
    models = {"fake": {"max_answer_chars": 1000, "fallbacks": ["echo"]}}
    chatbus = await start_chatbus(models=models)
    stream = await chatbus.chat(query="short", model_name="fake")
    assert (stream.text, "error" in stream.frames[-1]) == ("short", False)
    assert len(upstream.received) == 1  # not retried


async def test_an_endless_answer_stops_at_its_time_limit(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    endless(upstream, delay=0.02)
    chatbus = await start_chatbus(models={"fake": {"answer_timeout_seconds": 0.5}})
    async with asyncio.timeout(30):
        stream = await chatbus.chat(query="go on", model_name="fake")
    assert stream.frames[-1]["error"] == {
        "type": "upstream_timeout",
        "message": "the answer took longer than the limit of 0.5 s",
    }
    assert stream.text.startswith("w0 w1 ")
    (message_id,) = stream.message_ids
    record = await failed_record(chatbus, message_id)
    assert (record.error, record.response) == ("upstream_timeout", stream.text)
    (failed,) = await chatbus.events.wait_for("chat_failed")
    assert failed.error_type == "upstream_timeout"  # type: ignore[attr-defined]
    assert len(upstream.received) == 1
    assert await upstream.wait_for_close(5.0)


async def test_the_time_limit_covers_the_retries(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour = Behaviour(fail_status=503)
    chatbus = await start_chatbus(
        chat={"answer_timeout_seconds": 0.5},
        models={"fake": {"retries": 10, "retry_backoff": 0.2}},  # 0.1 s, 0.2 s, 0.4 s... each
    )
    async with asyncio.timeout(30):
        status, body = await chatbus.chat_json(query="x", model_name="fake")
    assert (status, body["error"]["type"], body["text"]) == (502, "upstream_timeout", "")
    assert 1 <= len(upstream.received) < 11
    await failed_record(chatbus, body["message_id"])


# --- checkpoints of a streaming answer (core/turn.py) ---------------------------------------


async def checkpoint(chatbus: Chatbus, message_id: str) -> MessageRecord | None:
    """The record of a streaming turn once it keeps some of the answer, else None."""
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None and record.status is Status.STREAMING
    return record if record.response else None


async def test_a_streaming_answer_is_checkpointed_as_it_goes(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(
        chat={"checkpoint_seconds": 0.05},
        models={"echo": {"provider": "echo", "delay": 0.05}},
    )
    words = [f"w{i} " for i in range(30)]
    seen = ""
    async with chatbus.post("/chat/chat", {"query": "".join(words), "stream": True}) as r:
        async for line in r.content:
            if line.startswith(b"data: "):
                frame = json.loads(line[6:])
                seen += frame["text"]
                if len(seen) >= len("".join(words[:10])):
                    break  # a third of the answer: look at what is stored meanwhile
        record = await wait_until(lambda: checkpoint(chatbus, frame["message_id"]), "a checkpoint")
    assert record is not None
    assert seen.startswith(record.response)  # what the client saw, up to a checkpoint


async def test_no_checkpoint_when_they_are_off(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(
        chat={"checkpoint_seconds": 0}, models={"echo": {"provider": "echo", "delay": 0.05}}
    )
    query = " ".join(f"w{i}" for i in range(30))
    async with chatbus.post("/chat/chat", {"query": query, "stream": True}) as r:
        line = await r.content.readline()
        message_id = json.loads(line[6:])["message_id"]
        await asyncio.sleep(0.3)  # what would be several checkpoints of 0.05 s
        record = await chatbus.store.get_message("default", message_id)
    assert record is not None and (record.status, record.response) == (Status.STREAMING, "")


# --- one owner per turn (ChatService.start's scope) -----------------------------------------


async def test_a_client_that_leaves_while_its_turn_is_written_ends_it_cancelled(
    chatbus: Chatbus, tmp_path: Path
) -> None:
    # Another connection holds the database's write lock: chatbus's write of the new turn
    # waits for it (busy_timeout) while the client leaves.
    lock = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        client = asyncio.create_task(chatbus.chat(query="x"))
        (received,) = await chatbus.events.wait_for("chat_received")
        await asyncio.sleep(0.1)  # the scenario: the write is now waiting for the lock
        client.cancel()  # the client leaves
        with contextlib.suppress(asyncio.CancelledError):
            await client
        await asyncio.sleep(0.2)  # the scenario: the server sees the connection close
    finally:
        lock.rollback()  # the write lands now, after the request is gone
        lock.close()
    (cancelled,) = await chatbus.events.wait_for("chat_cancelled")
    assert cancelled.message_id == received.message_id
    assert cancelled.text == ""  # type: ignore[attr-defined]
    record = await chatbus.store.get_message("default", received.message_id)
    assert record is not None and record.status is Status.CANCELLED


async def test_a_turn_whose_response_cannot_begin_ends_cancelled(chatbus: Chatbus) -> None:
    service = chatbus.app[SERVICE]
    with contextlib.suppress(RuntimeError):
        async with service.start(ChatInput(query="x"), Caller(request_id="r1")) as turn:
            raise RuntimeError("the response could not begin")  # as a failed prepare would
    (cancelled,) = await chatbus.events.wait_for("chat_cancelled")
    assert cancelled.message_id == turn.message_id
    record = await chatbus.store.get_message("default", turn.message_id)
    assert record is not None and record.status is Status.CANCELLED
