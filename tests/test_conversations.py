"""The conversations API (core/conversations.py): listing, reading and deleting a tenant's
conversations, paged, against a real server."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from chatbus.testing.fake_upstream import FakeUpstream
from core.auth import digest
from core.history import MessageRecord, Status
from tests.conftest import Chatbus, StartChatbus

pytestmark = pytest.mark.both_stores  # every test that starts a chatbus: SQLite and MongoDB


async def get(chatbus: Chatbus, path: str, **headers: str) -> tuple[int, Any]:
    async with chatbus.http.get(chatbus.url + path, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def delete(chatbus: Chatbus, path: str, **headers: str) -> tuple[int, Any]:
    async with chatbus.http.delete(chatbus.url + path, headers=headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def turn(chatbus: Chatbus, conversation_id: str, query: str, **body: Any) -> str:
    stream = await chatbus.chat(query=query, conversation_id=conversation_id, **body)
    (message_id,) = stream.message_ids
    return message_id


def listed(body: dict[str, Any]) -> list[str]:
    return [conversation["conversation_id"] for conversation in body["conversations"]]


async def test_conversations_are_listed_newest_first_with_their_summary(
    chatbus: Chatbus,
) -> None:
    await turn(chatbus, "a", "first of a")
    await turn(chatbus, "b", "first of b")
    await turn(chatbus, "a", "second of a")  # a is now the most recently active
    await turn(chatbus, "", "no conversation")  # "" groups nothing: never listed
    status, body = await get(chatbus, "/conversations")
    assert status == 200
    assert listed(body) == ["a", "b"]
    assert (body["limit"], body["offset"], body["next_offset"]) == (20, 0, None)
    a, b = body["conversations"]
    assert set(a) == {"conversation_id", "turns", "first_query", "created_at", "updated_at"}
    assert (a["turns"], a["first_query"]) == (2, "first of a")
    assert (b["turns"], b["first_query"]) == (1, "first of b")
    assert a["created_at"] <= b["created_at"] <= a["updated_at"]


async def test_conversations_are_paged(chatbus: Chatbus) -> None:
    for name in "abcde":
        await turn(chatbus, name, f"about {name}")
    status, body = await get(chatbus, "/conversations?limit=2")
    assert status == 200
    assert (listed(body), body["next_offset"]) == (["e", "d"], 2)
    _, body = await get(chatbus, "/conversations?limit=2&offset=2")
    assert (listed(body), body["limit"], body["offset"], body["next_offset"]) == (
        ["c", "b"],
        2,
        2,
        4,
    )
    _, body = await get(chatbus, "/conversations?limit=2&offset=4")
    assert (listed(body), body["next_offset"]) == (["a"], None)
    _, body = await get(chatbus, "/conversations?offset=10")
    assert (listed(body), body["next_offset"]) == ([], None)
    _, body = await get(chatbus, "/conversations?limit=100")
    assert (len(listed(body)), body["limit"]) == (5, 100)


async def test_conversations_are_paged_by_cursor(chatbus: Chatbus) -> None:
    for name in "abcde":
        await turn(chatbus, name, f"about {name}")
    status, body = await get(chatbus, "/conversations?limit=2")
    assert (status, listed(body), body["next_offset"]) == (200, ["e", "d"], 2)
    cursor = body["next_cursor"]
    assert isinstance(cursor, str) and cursor
    await turn(chatbus, "d", "d again")  # d moves to the front: a cursor does not list it twice
    status, body = await get(chatbus, f"/conversations?limit=2&cursor={cursor}")
    assert (status, listed(body), body["limit"], body["offset"]) == (200, ["c", "b"], 2, 0)
    assert body["next_offset"] is None  # nothing to page on from by offset after a cursor
    _, body = await get(chatbus, f"/conversations?limit=2&cursor={body['next_cursor']}")
    assert (listed(body), body["next_cursor"]) == (["a"], None)
    _, body = await get(chatbus, "/conversations?limit=100")
    assert (listed(body), body["next_cursor"]) == (["d", "e", "c", "b", "a"], None)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not-a-cursor",
        "%00%01",
        "W10",  # [] in base64url
        "WyJ4IiwiYyJd",  # ["x","c"]: the order's key is not a number
        "WzEsImMiLDNd",  # [1,"c",3]
        "eyJhIjoxfQ",  # {"a":1}
        "WzEuNSwiYyJd",  # [1.5,"c"]
        "W3RydWUsImMiXQ",  # [true,"c"]
        "x" * 3000,
        "w6k",  # not even JSON once decoded
    ],
)
async def test_a_bad_cursor_is_a_400_naming_it(chatbus: Chatbus, cursor: str) -> None:
    await turn(chatbus, "c", "exists")
    status, body = await get(chatbus, f"/conversations?cursor={cursor}")
    assert status == 400
    assert (body["error"]["type"], body["error"]["field"]) == ("invalid_cursor", "cursor")
    assert body["error"]["message"].startswith("cursor: ")


async def test_a_cursor_with_an_offset_is_a_400(chatbus: Chatbus) -> None:
    await turn(chatbus, "a", "one")
    await turn(chatbus, "b", "two")
    _, body = await get(chatbus, "/conversations?limit=1")
    status, body = await get(chatbus, f"/conversations?cursor={body['next_cursor']}&offset=0")
    assert (status, body["error"]["field"]) == (400, "cursor")
    assert "not both" in body["error"]["message"]


async def test_no_conversations_is_an_empty_list(chatbus: Chatbus) -> None:
    assert await get(chatbus, "/conversations") == (
        200,
        {"conversations": [], "limit": 20, "offset": 0, "next_offset": None, "next_cursor": None},
    )


async def test_messages_are_oldest_first_with_every_field(chatbus: Chatbus) -> None:
    first = await turn(chatbus, "talk", "hello there")
    second = await turn(chatbus, "talk", "and again")
    body = {"message_id": first, "score": 90, "reason": "nice"}
    async with chatbus.post("/chat/feedback", body) as response:
        assert response.status == 200
    status, body = await get(chatbus, "/conversations/talk/messages")
    assert status == 200
    assert (body["conversation_id"], body["limit"], body["offset"], body["next_offset"]) == (
        "talk",
        50,
        0,
        None,
    )
    one, two = body["messages"]
    assert set(one) == {
        "message_id", "query", "response", "status", "model", "usage", "latency", "error",
        "finish_reason", "reasoning", "tool_calls", "feedback", "created_at",
    }  # fmt: skip
    assert (one["message_id"], two["message_id"]) == (first, second)
    assert (one["query"], one["response"]) == ("hello there", "hello there")
    assert (one["status"], one["model"], one["error"]) == ("completed", "echo", None)
    assert one["feedback"] == {"score": 90, "reason": "nice"}
    assert (one["finish_reason"], one["reasoning"], one["tool_calls"]) == ("stop", "", [])
    assert two["feedback"] is None  # no feedback: score -1 in the store
    assert isinstance(one["latency"], float) and one["latency"] >= 0
    assert 0 < one["created_at"] <= two["created_at"]
    assert one["usage"] == {"prompt_tokens": 2, "completion_tokens": 2}  # echo counts words


async def test_messages_show_usage_and_failures(chatbus: Chatbus, upstream: FakeUpstream) -> None:
    upstream.behaviour.tokens = ["Hi", " you"]  # usage counts words: 2 in, 2 pieces out
    await turn(chatbus, "mixed", "count me", model_name="fake")
    upstream.behaviour.fail_status = 400  # not retried: the turn fails
    await turn(chatbus, "mixed", "fail me", model_name="fake")
    _, body = await get(chatbus, "/conversations/mixed/messages")
    ok, failed = body["messages"]
    assert (ok["status"], ok["model"], ok["response"]) == ("completed", "fake", "Hi you")
    assert ok["usage"] == {"prompt_tokens": 2, "completion_tokens": 2}
    assert (failed["status"], failed["error"], failed["response"]) == (
        "failed",
        "bad_request",
        "",
    )


async def test_messages_are_paged(chatbus: Chatbus) -> None:
    ids = [await turn(chatbus, "long", f"turn {n}") for n in range(5)]

    async def page(query: str) -> tuple[list[str], Any]:
        status, body = await get(chatbus, f"/conversations/long/messages?{query}")
        assert status == 200
        return [message["message_id"] for message in body["messages"]], body["next_offset"]

    assert await page("limit=2") == (ids[:2], 2)
    assert await page("limit=2&offset=2") == (ids[2:4], 4)
    assert await page("limit=2&offset=4") == (ids[4:], None)
    assert await page("limit=200") == (ids, None)
    # Past the end of a conversation that exists: an empty page, not a 404.
    assert await page("offset=5") == ([], None)


async def test_delete_removes_the_conversation(chatbus: Chatbus) -> None:
    await turn(chatbus, "doomed", "one")
    await turn(chatbus, "doomed", "two")
    await turn(chatbus, "kept", "three")
    assert await delete(chatbus, "/conversations/doomed") == (
        200,
        {"conversation_id": "doomed", "deleted": 2},
    )
    _, body = await get(chatbus, "/conversations")
    assert listed(body) == ["kept"]
    status, body = await get(chatbus, "/conversations/doomed/messages")
    assert (status, body["error"]["type"]) == (404, "not_found")
    status, body = await delete(chatbus, "/conversations/doomed")  # gone: nothing to delete
    assert (status, body["error"]["type"]) == (404, "not_found")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_an_unknown_conversation_is_a_404(chatbus: Chatbus, method: str) -> None:
    await turn(chatbus, "known", "hi")
    path = "/conversations/unknown" + ("/messages" if method == "GET" else "")
    async with chatbus.http.request(method, chatbus.url + path) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert (error["type"], error["field"]) == ("not_found", "conversation_id")
    assert "unknown" in error["message"]


async def test_conversation_ids_are_url_decoded(chatbus: Chatbus) -> None:
    name = "a b/ü?#"
    await turn(chatbus, name, "odd id")
    _, body = await get(chatbus, "/conversations")
    assert listed(body) == [name]
    status, body = await get(chatbus, f"/conversations/{quote(name, safe='')}/messages")
    assert (status, body["conversation_id"], len(body["messages"])) == (200, name, 1)
    assert await delete(chatbus, f"/conversations/{quote(name, safe='')}") == (
        200,
        {"conversation_id": name, "deleted": 1},
    )


@pytest.mark.parametrize("path", ["/conversations?{query}", "/conversations/c/messages?{query}"])
@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=-1", "limit"),
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("limit=%201", "limit"),
        ("limit=1_0", "limit"),
        ("limit=201", "limit"),
        ("limit=99999999999999999999999", "limit"),
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
        ("offset=1e3", "offset"),
        ("offset=1000000001", "offset"),
        ("limit=5&offset=-3", "offset"),
    ],
)
async def test_a_bad_limit_or_offset_is_a_422_naming_it(
    chatbus: Chatbus, path: str, query: str, field: str
) -> None:
    await turn(chatbus, "c", "exists")
    status, body = await get(chatbus, path.format(query=query))
    assert status == 422
    assert (body["error"]["type"], body["error"]["field"]) == ("validation_error", field)
    assert body["error"]["message"].startswith(f"{field}: ")


async def test_each_list_has_its_own_maximum(chatbus: Chatbus) -> None:
    await turn(chatbus, "c", "exists")
    status, body = await get(chatbus, "/conversations?limit=101")
    assert (status, body["error"]["field"]) == (422, "limit")
    assert "100" in body["error"]["message"]
    status, body = await get(chatbus, "/conversations/c/messages?limit=200")
    assert (status, body["limit"]) == (200, 200)


async def test_another_tenants_conversations_are_invisible(chatbus: Chatbus) -> None:
    await chatbus.store.add_message(
        MessageRecord("theirs", "shared", "their secret", "echo", tenant="other",
                      response="hidden", status=Status.COMPLETED, created_at=1.0)
    )  # fmt: skip
    await chatbus.store.add_message(
        MessageRecord("only", "private", "their own", "echo", tenant="other", created_at=2.0)
    )
    mine = await turn(chatbus, "shared", "my question")  # the same id, another tenant
    _, body = await get(chatbus, "/conversations")
    assert listed(body) == ["shared"]
    assert (body["conversations"][0]["turns"], body["conversations"][0]["first_query"]) == (
        1,
        "my question",
    )
    _, body = await get(chatbus, "/conversations/shared/messages")
    assert [message["message_id"] for message in body["messages"]] == [mine]
    # Another tenant's conversation is a 404, as one that does not exist: ids do not leak.
    status, body = await get(chatbus, "/conversations/private/messages")
    assert (status, body["error"]["type"]) == (404, "not_found")
    status, _ = await delete(chatbus, "/conversations/private")
    assert status == 404
    assert await delete(chatbus, "/conversations/shared") == (
        200,
        {"conversation_id": "shared", "deleted": 1},
    )
    assert await chatbus.store.get_message("other", "theirs") is not None
    assert await chatbus.store.get_message("other", "only") is not None
    assert [c.conversation_id for c in await chatbus.store.conversations("other", 10, 0)] == [
        "private",
        "shared",
    ]


async def test_api_keys_scope_the_routes_to_their_tenant(start_chatbus: StartChatbus) -> None:
    keys = {name: f"cb-{name}-0123456789abcdef" for name in ("alice", "bob")}
    chatbus = await start_chatbus(
        auth={
            "keys": {
                name: {"tenant": f"tenant-{name}", "sha256": digest(key)}
                for name, key in keys.items()
            }
        }
    )
    alice = {"Authorization": f"Bearer {keys['alice']}"}
    bob = {"Authorization": f"Bearer {keys['bob']}"}
    body = {"query": "alice's", "conversation_id": "c", "stream": False}
    async with chatbus.http.post(chatbus.url + "/chat/chat", json=body, headers=alice) as r:
        assert r.status == 200
    _, listing = await get(chatbus, "/conversations", **alice)
    assert listed(listing) == ["c"]
    assert (await get(chatbus, "/conversations", **bob))[1]["conversations"] == []
    assert (await get(chatbus, "/conversations/c/messages", **bob))[0] == 404
    assert (await delete(chatbus, "/conversations/c", **bob))[0] == 404
    assert (await get(chatbus, "/conversations", **{}))[0] == 401
    status, messages = await get(chatbus, "/conversations/c/messages", **alice)
    assert (status, len(messages["messages"])) == (200, 1)


async def test_an_unreachable_store_is_a_503(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(
        history={
            "backend": "mongo",
            "mongo": {"uri": "mongodb://127.0.0.1:9/", "server_selection_timeout": 0.2},
        }
    )
    for method, path in [
        ("GET", "/conversations"),
        ("GET", "/conversations/c/messages"),
        ("DELETE", "/conversations/c"),
    ]:
        async with chatbus.http.request(method, chatbus.url + path) as response:
            assert response.status == 503, path
            error = (await response.json())["error"]
        assert error["type"] == "store_unavailable"
        assert "try again" in error["message"]
