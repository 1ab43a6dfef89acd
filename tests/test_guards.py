"""core/guards.py: a keyless chatbus answers only loopback Host headers (DNS rebinding) and
JSON bodies (CSRF); a body that cannot be read is a 4xx."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from core.auth import digest
from tests.conftest import Chatbus, StartChatbus

JSON = {"Content-Type": "application/json"}
BODY = b'{"query": "hi"}'


def stored(chatbus: Chatbus) -> Any:
    return chatbus.store.conversations("default", 100, 0)


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST:7861", "127.0.0.1", "127.3.2.1:80", "[::1]", "[::1]:7861"],
)
async def test_loopback_hosts_are_served(chatbus: Chatbus, host: str) -> None:
    async with chatbus.http.get(chatbus.url + "/conversations", headers={"Host": host}) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:7861",
        "localhost.attacker.example",
        "127.0.0.1.nip.io",
        "[::2]",
        "10.0.0.1",
        "127.0.0.1:x",
        "[::1",
    ],
)
async def test_other_hosts_are_refused_without_keys(chatbus: Chatbus, host: str) -> None:
    for path in ("/conversations", "/health/live"):
        async with chatbus.http.get(chatbus.url + path, headers={"Host": host}) as r:
            assert r.status == 421
            error = (await r.json())["error"]
        assert error["type"] == "misdirected_request"
        assert "[server] allowed_hosts" in error["message"]
    headers = {"Host": host, **JSON}
    async with chatbus.http.post(chatbus.url + "/chat/chat", data=BODY, headers=headers) as r:
        assert r.status == 421
    assert await stored(chatbus) == []
    assert chatbus.events.events == []


async def test_v1_paths_answer_a_refused_host_in_openai_shape(chatbus: Chatbus) -> None:
    headers = {"Host": "attacker.example"}
    async with chatbus.http.get(chatbus.url + "/v1/models", headers=headers) as r:
        assert r.status == 421
        error = (await r.json())["error"]
    assert error["code"] == "misdirected_request"
    assert "[server] allowed_hosts" in error["message"]


async def test_allowed_hosts_are_served(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(server={"allowed_hosts": ["chat.internal", "[fd00::1]"]})
    for host in ("chat.internal", "Chat.Internal:8080", "[fd00::1]:80", "localhost"):
        async with chatbus.http.get(chatbus.url + "/conversations", headers={"Host": host}) as r:
            assert r.status == 200, host
    async with chatbus.http.get(chatbus.url + "/models", headers={"Host": "other"}) as r:
        assert r.status == 421


async def test_a_star_serves_any_host(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(server={"allowed_hosts": ["*"]})
    async with chatbus.http.get(chatbus.url + "/models", headers={"Host": "any.where"}) as r:
        assert r.status == 200


async def test_with_keys_any_host_is_served(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(auth={"keys": {"a": {"tenant": "a", "sha256": digest("k")}}})
    headers = {"Host": "chat.example.com", "Authorization": "Bearer k"}
    async with chatbus.http.get(chatbus.url + "/conversations", headers=headers) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/jsonp",
        None,  # a body with no Content-Type at all
    ],
)
@pytest.mark.parametrize("path", ["/chat/chat", "/v1/chat/completions", "/chat/feedback"])
async def test_a_body_that_is_not_declared_json_is_a_415(
    chatbus: Chatbus, content_type: str | None, path: str
) -> None:
    body = (
        b'{"query": "hi", "callback_url": "http://127.0.0.1/x", '
        b'"messages": [{"role": "user", "content": "hi"}], "message_id": "m", "score": 1}'
    )
    headers = {"Content-Type": content_type} if content_type else {}
    # skip_auto_headers: aiohttp would name bytes application/octet-stream otherwise
    async with chatbus.http.post(
        chatbus.url + path, data=body, headers=headers, skip_auto_headers=["Content-Type"]
    ) as r:
        assert r.status == 415
        error = (await r.json())["error"]
    assert "application/json" in error["message"]
    assert await stored(chatbus) == []
    assert chatbus.events.events == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_json_with_or_without_a_charset_is_served(
    chatbus: Chatbus, content_type: str
) -> None:
    headers = {"Content-Type": content_type}
    async with chatbus.http.post(chatbus.url + "/chat/chat", data=BODY, headers=headers) as r:
        assert r.status == 200
        assert (await r.json())["text"] == "hi"


async def test_an_empty_post_with_no_content_type_is_served(chatbus: Chatbus) -> None:
    """chatchat's webui POSTs with no body and no Content-Type: the route answers, not 415."""
    async with chatbus.http.post(
        chatbus.url + "/server/configs", skip_auto_headers=["Content-Type"]
    ) as r:
        assert r.status == 200
    async with chatbus.http.post(
        chatbus.url + "/chat/chat", skip_auto_headers=["Content-Type"]
    ) as r:
        assert r.status == 422  # every field's default, and `query` has none
        assert (await r.json())["error"]["field"] == "query"


@pytest.mark.parametrize("encoding", ["deflate", "gzip", "br", "zstd", "x-unknown"])
async def test_a_body_in_a_bad_content_encoding_is_a_400(chatbus: Chatbus, encoding: str) -> None:
    headers = {**JSON, "Content-Encoding": encoding}
    async with chatbus.http.post(
        chatbus.url + "/chat/chat", data=b"not compressed at all", headers=headers
    ) as r:
        assert 400 <= r.status < 500
        assert "error" in await r.json()
    assert await stored(chatbus) == []


async def test_a_deflated_body_is_read(chatbus: Chatbus) -> None:
    headers = {**JSON, "Content-Encoding": "deflate"}
    async with chatbus.http.post(
        chatbus.url + "/chat/chat", data=zlib.compress(BODY), headers=headers
    ) as r:
        assert r.status == 200
        assert (await r.json())["text"] == "hi"


async def test_a_body_over_the_limit_is_a_413(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(server={"max_body_bytes": 64})
    body = b'{"query": "' + b"x" * 100 + b'"}'
    async with chatbus.http.post(chatbus.url + "/chat/chat", data=body, headers=JSON) as r:
        assert r.status == 413
    assert await stored(chatbus) == []
