"""chatchat 0.2.x's own client against /chat/chat, unchanged and unpaced: every character
arrives whenever several frames reach it in one network read (a burst from the upstream,
load), with each of its parsers; its default request body works; errors are errors to it.
See tests/chatchat_client.py for the client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from chatbus.testing.fake_upstream import FakeUpstream
from tests.chatchat_client import (
    PARSERS,
    Parser,
    chat_chat_body,
    check_error_msg,
    parse_v0_2_8,
    parse_v0_2_10,
    read_chunks,
    read_chunks_sync,
    text_of,
)
from tests.conftest import Chatbus, StartChatbus

BURST = [f"w{i}·{'é' if i % 3 else '你好'} " for i in range(200)]  # 200 deltas, ~1.4k chars


def whole(results: list[dict[str, Any]], expected: str) -> bool:
    return text_of(results) == expected and len({r["message_id"] for r in results}) == 1


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
async def test_200_deltas_in_one_upstream_write_arrive_whole(
    chatbus: Chatbus, upstream: FakeUpstream, parser: Parser
) -> None:
    upstream.behaviour.tokens = BURST
    upstream.behaviour.one_write = True
    body = chat_chat_body("go", model="fake")
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):  # every trial, not most
            chunks = await read_chunks(client, chatbus.url + "/chat/chat", body)
            assert whole(parser(chunks), "".join(BURST))
    # The sync client, as chatchat's webui (streamlit) runs it.
    chunks = await asyncio.to_thread(read_chunks_sync, chatbus.url + "/chat/chat", body)
    assert whole(parser(chunks), "".join(BURST))


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
async def test_60_concurrent_streams_at_a_token_every_10_ms(
    chatbus: Chatbus, upstream: FakeUpstream, parser: Parser
) -> None:
    tokens = [f"t{i} " for i in range(40)]
    upstream.behaviour.tokens = tokens
    upstream.behaviour.delay = 0.01
    body = chat_chat_body("go", model="fake")
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        for _ in range(2):
            answers = await asyncio.gather(
                *(read_chunks(client, chatbus.url + "/chat/chat", body) for _ in range(60))
            )
            assert sum(whole(parser(chunks), "".join(tokens)) for chunks in answers) == 60


@pytest.mark.parametrize("parser", PARSERS.values(), ids=PARSERS.keys())
async def test_the_bench_fast_upstream_under_load(
    chatbus: Chatbus, upstream: FakeUpstream, parser: Parser
) -> None:
    upstream.behaviour.token_count = 20  # bench/__main__.py's fast upstream: no delay at all
    expected = "".join(f"tok{i} " for i in range(20))
    body = chat_chat_body("go", model="fake")
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        for _ in range(3):
            answers = await asyncio.gather(
                *(read_chunks(client, chatbus.url + "/chat/chat", body) for _ in range(50))
            )
            assert sum(whole(parser(chunks), expected) for chunks in answers) == 50


async def test_keepalive_pings_are_chunks_of_their_own(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(
        chat={"keepalive_seconds": 0.02},
        models={"echo": {"provider": "echo", "delay": 0.05}},
    )
    query = " ".join(f"p{i}" for i in range(10))
    async with httpx.AsyncClient(timeout=30) as client:
        chunks = await read_chunks(
            client, chatbus.url + "/chat/chat", chat_chat_body(query, "echo")
        )
    pings = [chunk for chunk in chunks if chunk.startswith(":")]
    assert pings and set(pings) == {": ping\r\n\r\n"}
    for parser in PARSERS.values():
        assert whole(parser(chunks), query)


async def test_the_clients_own_defaults_work(chatbus: Chatbus) -> None:
    # ApiRequest.chat_chat("hi", model=...): conversation_id and max_tokens null.
    async with httpx.AsyncClient(timeout=30) as client:
        chunks = await read_chunks(client, chatbus.url + "/chat/chat", chat_chat_body("hi", "echo"))
    assert text_of(parse_v0_2_10(chunks)) == "hi"


async def test_null_means_the_default_for_every_field(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    fields = ("conversation_id", "history_len", "history", "stream", "model_name")
    nulls = dict.fromkeys(
        (*fields, "temperature", "max_tokens", "prompt_name", "callback_url"), None
    )
    status, body = await chatbus.chat_json(query="one two", **nulls)
    assert (status, body["text"]) == (200, "one two")  # the default model: echo
    await chatbus.chat_json(query="x", **{**nulls, "model_name": "fake"})
    sent = upstream.received[-1].body
    assert sent["temperature"] == 0.7
    assert "max_tokens" not in sent
    assert [m["role"] for m in sent["messages"]] == ["user"]
    async with chatbus.post("/chat/feedback", {"message_id": body["message_id"], "score": 90,
                                               "reason": None}) as response:  # fmt: skip
        assert response.status == 200


async def test_history_in_chatchats_forms(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    history = [
        ["human", "a pair"],
        ("ai", "a tuple"),  # sent as a list
        {"role": "human", "content": "alias"},
        {"role": "ai", "content": "alias too"},
        {"role": "system", "content": "sys"},
        ["user", "u", "extra items ignored"],
        {"role": "assistant", "content": "as"},
    ]
    status, _ = await chatbus.chat_json(query="now", model_name="fake", history=history)
    assert status == 200
    sent = upstream.received[-1].body["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", "a pair"),
        ("assistant", "a tuple"),
        ("user", "alias"),
        ("assistant", "alias too"),
        ("system", "sys"),
        ("user", "u"),
        ("assistant", "as"),
        ("user", "now"),
    ]


@pytest.mark.parametrize("bad", [["user"], [7, "x"], {"role": "robot", "content": "x"}])
async def test_a_history_item_of_no_known_form_is_a_422(chatbus: Chatbus, bad: Any) -> None:
    status, body = await chatbus.chat_json(query="x", history=[bad])
    assert status == 422
    assert body["error"]["field"].startswith("history.0")
    assert check_error_msg(body) == body["msg"] == body["error"]["message"]


async def test_every_error_is_an_error_to_chatchats_webui(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus()
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/chat/chat", {"query": ""}, 422),
        ("POST", "/chat/chat", {"query": "x", "model_name": "nope"}, 400),
        ("POST", "/chat/chat", {"query": "x", "prompt_name": "nope"}, 400),
        ("POST", "/chat/chat", b"{not json", 400),
        ("POST", "/chat/chat", {"query": "x", "callback_url": "http://[a/"}, 400),
        ("POST", "/chat/feedback", {"message_id": "nope", "score": 1}, 404),
        ("GET", "/chat/chat", None, 405),
        ("GET", "/no/such/path", None, 404),
    ]
    async with httpx.AsyncClient(timeout=30) as client:
        for method, path, body, status in cases:
            data: dict[str, Any] = {"json": body}
            if isinstance(body, bytes):
                data = {"content": body, "headers": {"Content-Type": "application/json"}}
            response = await client.request(method, chatbus.url + path, **data)
            answer = response.json()
            assert response.status_code == status, (path, answer)
            assert answer["code"] == status
            assert check_error_msg(answer) == answer["msg"] == answer["error"]["message"]
            # The stream form: chatchat's client parses the JSON body as one chunk.
            if path == "/chat/chat" and method == "POST" and isinstance(body, dict):
                chunks = await read_chunks(client, chatbus.url + path, {**body, "stream": True})
                (result,) = parse_v0_2_10(chunks)
                assert check_error_msg(result) == answer["msg"]


async def test_a_failed_model_is_an_error_in_the_stream_and_not(
    chatbus: Chatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.break_after = 2
    async with httpx.AsyncClient(timeout=30) as client:
        chunks = await read_chunks(client, chatbus.url + "/chat/chat", chat_chat_body("x", "fake"))
        *answer, last = parse_v0_2_10(chunks)
        assert text_of(answer) == "Hello from"
        assert check_error_msg(last) == last["msg"] == last["error"]["message"]
        assert (last["text"], last["code"]) == ("", 502)
        assert last["message_id"] == answer[0]["message_id"]
        response = await client.post(
            chatbus.url + "/chat/chat", json=chat_chat_body("x", "fake", stream=False)
        )
    body = response.json()
    assert (response.status_code, body["code"], body["text"]) == (502, 502, "Hello from")
    assert check_error_msg(body) == body["error"]["message"]


async def test_bare_json_frames_for_chatchat_0_2_8(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    chatbus = await start_chatbus(plugins={"chatchat": {"frames": "json"}})
    upstream.behaviour.tokens = BURST
    upstream.behaviour.one_write = True
    async with httpx.AsyncClient(timeout=30) as client:
        chunks = await read_chunks(client, chatbus.url + "/chat/chat", chat_chat_body("x", "fake"))
    assert all(json.loads(chunk) for chunk in chunks)  # no pings, no `data:`
    for parser in (parse_v0_2_8, *PARSERS.values()):
        assert whole(parser(chunks), "".join(BURST))


async def test_a_bad_chatchat_setting_stops_start_up(start_chatbus: StartChatbus) -> None:
    from core.config import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\.chatchat\.frames"):
        await start_chatbus(plugins={"chatchat": {"frames": "xml"}})
