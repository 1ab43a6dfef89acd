"""Core's own routes (core/routes.py) and the HTTP plumbing around every route."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from aiohttp import web

from core.events import FeedbackReceived
from core.hookspecs import hookimpl
from core.keys import CONFIG
from tests.conftest import Chatbus, StartChatbus


async def ask(chatbus: Chatbus) -> str:
    (message_id,) = (await chatbus.chat(query="rate me")).message_ids
    return message_id


async def test_feedback_is_stored_and_published(chatbus: Chatbus) -> None:
    message_id = await ask(chatbus)
    body = {"message_id": message_id, "score": 80, "reason": "good"}
    async with chatbus.post("/chat/feedback", body) as response:
        assert response.status == 200
        assert await response.json() == {
            "code": 200,
            "msg": f"feedback recorded for {message_id}",
            "data": None,
        }
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert (record.feedback_score, record.feedback_reason) == (80, "good")
    (event,) = await chatbus.events.wait_for("feedback_received")
    assert isinstance(event, FeedbackReceived)
    assert (event.message_id, event.score, event.reason) == (message_id, 80, "good")


async def test_feedback_on_an_unknown_message_is_a_404(chatbus: Chatbus) -> None:
    async with chatbus.post("/chat/feedback", {"message_id": "nope", "score": 1}) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert (error["type"], error["field"]) == ("not_found", "message_id")
    assert chatbus.events.of("feedback_received") == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"score": 10}, "message_id"),
        ({"message_id": "", "score": 10}, "message_id"),
        ({"message_id": "x" * 65, "score": 10}, "message_id"),
        ({"message_id": "m"}, "score"),
        ({"message_id": "m", "score": 101}, "score"),
        ({"message_id": "m", "score": -1}, "score"),
        ({"message_id": "m", "score": "high"}, "score"),
        ({"message_id": "m", "score": 5, "reason": 7}, "reason"),
    ],
)
async def test_bad_feedback_names_the_field(
    chatbus: Chatbus, body: dict[str, Any], field: str
) -> None:
    message_id = await ask(chatbus)
    body = {**body, "message_id": message_id} if body.get("message_id") == "m" else body
    async with chatbus.post("/chat/feedback", body) as response:
        assert response.status == 422
        assert (await response.json())["error"]["field"] == field
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None and record.feedback_score == -1


async def test_unknown_route_and_method_are_json_errors(chatbus: Chatbus) -> None:
    async with chatbus.http.get(chatbus.url + "/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found"
    async with chatbus.http.get(chatbus.url + "/chat/chat") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"]["type"] == "method_not_allowed"


async def test_request_ids(chatbus: Chatbus) -> None:
    headers = {"X-Request-Id": "abc-123"}
    async with chatbus.http.post(
        chatbus.url + "/chat/chat", json={"query": "x"}, headers=headers
    ) as response:
        assert response.headers["X-Request-Id"] == "abc-123"
    await chatbus.events.wait_for("chat_completed")
    assert chatbus.events.of("chat_completed")[0].request_id == "abc-123"  # type: ignore[attr-defined]
    async with chatbus.post("/chat/chat", {"query": "x", "stream": True}) as response:
        assert len(response.headers["X-Request-Id"]) == 32  # streamed answers too
    unsafe = {"X-Request-Id": "bad id\twith spaces"}
    async with chatbus.http.post(
        chatbus.url + "/chat/chat", json={"query": "x"}, headers=unsafe
    ) as response:
        assert len(response.headers["X-Request-Id"]) == 32


class ExtraRoute:
    @hookimpl
    def register_routes(self, app: web.Application, router: web.UrlDispatcher) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"hello": request.app[CONFIG].default_model})

        router.add_get("/extra/hello", hello)


async def test_a_plugin_adds_a_route(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(ExtraRoute())
    async with chatbus.http.get(chatbus.url + "/extra/hello") as response:
        assert response.status == 200
        assert await response.json() == {"hello": "echo"}


async def test_one_access_log_line_per_request_bound_to_its_ids(chatbus: Chatbus) -> None:
    with structlog.testing.capture_logs() as logs:
        async with chatbus.http.post(
            chatbus.url + "/chat/chat", json={"query": "x"}, headers={"X-Request-Id": "r-1"}
        ) as response:
            assert response.status == 200
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/chat/chat", 200)
    assert line["tenant"] == "default"
    assert line["ms"] >= 0
