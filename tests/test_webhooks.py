"""Signed webhooks through the durable outbox (plugins/transports/webhook), delivered to real
receivers on loopback and verified with the standardwebhooks package."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import structlog
from aiohttp import web
from standardwebhooks import Webhook

from core.app import create_app
from core.config import ConfigError
from core.events import ChatCompleted
from core.hookspecs import hookimpl
from core.outbox import DeliveryStatus
from core.plugins import make_plugin_manager
from core.server import start
from tests.conftest import Chatbus, StartChatbus, make_config

SECRET = "whsec_" + base64.b64encode(b"chatbus-test-secret-0123456789ab").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"chatbus-old-secret-0123456789abc").decode()
FAST = {"schedule": [0.05, 0.05, 0.05], "poll_seconds": 0.05, "timeout_seconds": 0.5}


@dataclass
class Receiver:
    """A webhook receiver: answers with `answers` in turn (then 200), after `delay`."""

    answers: list[int] = field(default_factory=list)
    delay: float = 0.0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        self.arrived.set()
        await asyncio.sleep(self.delay)
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    def payloads(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.requests]

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = await start(app, "127.0.0.1", 0, grace=0.1)
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield hook
    await runner.cleanup()


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)


def webhooks(receiver: Receiver, **endpoint: Any) -> dict[str, Any]:
    return {
        "webhooks": [{"url": receiver.url, "secret_env": "HOOK_SECRET", **endpoint}],
        "webhook_delivery": FAST,
    }


async def outbox(chatbus: Chatbus, status: DeliveryStatus | None = None) -> list[Any]:
    return await chatbus.store.deliveries(status, 100)


async def settled(chatbus: Chatbus, status: DeliveryStatus) -> Any:
    """The first delivery to reach `status` (polling the store: 5 s at most)."""
    for _ in range(250):
        if found := await outbox(chatbus, status):
            return found[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no delivery became {status} in 5 s")


async def test_a_completed_chat_is_delivered_signed(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    chatbus = await start_chatbus(**webhooks(receiver))
    stream = await chatbus.chat(query="hello hooks", conversation_id="c1")
    await receiver.wait_for(1)
    headers, body = receiver.requests[0]
    # Verified as a receiver would, with the standard library of the spec.
    verified = Webhook(SECRET).verify(body, headers)
    assert verified["type"] == "chat.completed"
    data = verified["data"]
    assert data["message_id"] in stream.message_ids
    assert (data["text"], data["status"], data["model"]) == ("hello hooks", "completed", "echo")
    assert (data["conversation_id"], data["query"]) == ("c1", "hello hooks")
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 2}
    assert headers["webhook-id"].startswith("msg_")
    delivered = await settled(chatbus, DeliveryStatus.DELIVERED)
    assert (delivered.attempts, delivered.delivery_id) == (1, headers["webhook-id"])


async def test_only_subscribed_events(start_chatbus: StartChatbus, receiver: Receiver) -> None:
    chatbus = await start_chatbus(**webhooks(receiver, events=["chat_started", "chat_failed"]))
    await chatbus.chat(query="hi")
    await receiver.wait_for(1)
    await asyncio.sleep(0.2)
    assert [p["type"] for p in receiver.payloads()] == ["chat.started"]


async def test_failing_then_succeeding_keeps_one_webhook_id(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers = [500, 503, 429]
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="retry me")
    await receiver.wait_for(4)
    assert len({headers["webhook-id"] for headers, _ in receiver.requests}) == 1
    delivered = await settled(chatbus, DeliveryStatus.DELIVERED)
    assert delivered.attempts == 4


async def test_after_the_last_attempt_it_is_dead(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers = [500] * 10
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="never")
    dead = await settled(chatbus, DeliveryStatus.DEAD)
    assert (dead.attempts, dead.last_error) == (4, "HTTP 500")  # the first, then 3 retries
    assert len(receiver.requests) == 4


async def test_a_receiver_answering_410_stops_it(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers = [410]
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="gone")
    stopped = await settled(chatbus, DeliveryStatus.STOPPED)
    assert (stopped.attempts, stopped.last_error) == (1, "HTTP 410")
    await asyncio.sleep(0.2)
    assert len(receiver.requests) == 1


async def test_a_slow_receiver_is_tried_again(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.delay = 1.0  # beyond the 0.5 s timeout
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="slow")
    await receiver.wait_for(2)
    receiver.delay = 0.0
    delivered = await settled(chatbus, DeliveryStatus.DELIVERED)
    assert delivered.attempts >= 2


async def test_several_signatures_while_a_secret_rotates(
    start_chatbus: StartChatbus, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_SECRET", f"{SECRET} {OLD_SECRET}")
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="rotate")
    await receiver.wait_for(1)
    headers, body = receiver.requests[0]
    assert len(headers["webhook-signature"].split()) == 2
    for secret in (SECRET, OLD_SECRET):  # a receiver on either secret accepts it
        assert Webhook(secret).verify(body, headers)["type"] == "chat.completed"


async def test_a_receiver_down_across_a_restart_gets_it_once_after(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers = [503] * 3  # down for the whole life of the first instance
    config = webhooks(receiver, events=["chat_completed"])
    config["webhook_delivery"] = {**FAST, "schedule": [0.05, 0.05, 1.0]}  # due after the restart
    first = await start_chatbus(**config)
    await first.chat(query="survive")
    await receiver.wait_for(3)
    await first.close()  # the delivery is pending in the store file
    (pending,) = await _pending_in(first)
    second = await start_chatbus(**webhooks(receiver, events=["chat_completed"]))
    await receiver.wait_for(4)
    await settled(second, DeliveryStatus.DELIVERED)
    await asyncio.sleep(0.2)
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert ids == [pending.delivery_id] * 4
    assert [h["webhook-id"] for h, _ in receiver.requests[3:]] == [pending.delivery_id]


async def _pending_in(bus: Chatbus) -> list[Any]:
    from plugins.history_sqlite.store import SqliteStore

    store = SqliteStore(bus.store.path)  # type: ignore[attr-defined]
    await store.open()
    try:
        return await store.deliveries(DeliveryStatus.PENDING, 10)
    finally:
        await store.close()


async def test_two_instances_on_one_store_deliver_each_once(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.delay = 0.05
    one = await start_chatbus(**webhooks(receiver))
    two = await start_chatbus(**webhooks(receiver))  # the same store file
    for i in range(10):
        await (one if i % 2 else two).chat(query=f"q{i}")
    await receiver.wait_for(10)
    await asyncio.sleep(0.3)
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(ids) == len(set(ids)) == 10
    assert len(await outbox(one, DeliveryStatus.DELIVERED)) == 10


async def test_a_missing_secret_is_retried_not_sent_unsigned(
    start_chatbus: StartChatbus, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOOK_SECRET")
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="unsigned")
    dead = await settled(chatbus, DeliveryStatus.DEAD)
    assert dead.last_error == "the environment variable HOOK_SECRET is not set"
    assert receiver.requests == []
    assert SECRET not in str(dead) and "HOOK_SECRET" in str(dead)
    assert os.environ.get("HOOK_SECRET") is None


def test_plan_deliveries_for_subscribed_endpoints_only(tmp_path: Any) -> None:
    config = make_config(
        tmp_path,
        webhooks=[
            {"url": "http://127.0.0.1:1/a", "secret_env": "HOOK_SECRET"},
            {"url": "http://127.0.0.1:1/b", "secret_env": "B", "events": ["chat_started"]},
        ],
    )
    pm = make_plugin_manager(entry_points=False)
    event = ChatCompleted(message_id="m1", conversation_id="c", tenant="t", request_id="r",
                          model="echo", query="q", text="answer", usage=None, latency=0.1,
                          first_token_latency=None)  # fmt: skip
    planned = [d for found in pm.hook.plan_deliveries(event=event, config=config) for d in found]
    (delivery,) = planned
    assert (delivery.url, delivery.secret_env, delivery.event_type) == (
        "http://127.0.0.1:1/a",
        "HOOK_SECRET",
        "chat.completed",
    )
    payload = orjson.loads(delivery.payload)
    assert payload["data"]["text"] == "answer" and payload["data"]["status"] == "completed"


class BrokenPlanner:
    @hookimpl
    def plan_deliveries(self, event: Any, config: Any) -> None:
        raise RuntimeError("planner bug")


async def test_a_broken_planner_changes_nothing_for_the_client(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(BrokenPlanner())
    assert (await chatbus.chat(query="still here")).text == "still here"
    assert await outbox(chatbus) == []


def test_bad_webhook_config_is_one_line(tmp_path: Any) -> None:
    config = make_config(tmp_path, webhooks=[{"url": "ftp://x", "secret_env": "S"}])
    with pytest.raises(
        ConfigError, match=r"^webhooks\.0\.url: must start with http:// or https://$"
    ):
        create_app(config)


# Async mode: callback_url


def async_mode(receiver: Receiver, **chat: Any) -> dict[str, Any]:
    allowed = [urlsplit(receiver.url).netloc]  # 127.0.0.1:<port>: a bare host means port 80
    return {
        "chat": {"callback_hosts": allowed, "callback_secret_env": "HOOK_SECRET", **chat},
        "webhook_delivery": FAST,
    }


async def test_async_chat_answers_202_and_delivers_the_answer(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    chatbus = await start_chatbus(**async_mode(receiver))
    body = {"query": "answer me later", "callback_url": receiver.url, "stream": True}
    async with chatbus.post("/chat/chat", body) as response:
        assert response.status == 202
        accepted = await response.json()
    assert set(accepted) == {"message_id", "status"} and accepted["status"] == "accepted"
    await receiver.wait_for(1)
    headers, raw = receiver.requests[0]
    payload = Webhook(SECRET).verify(raw, headers)
    assert payload["type"] == "chat.completed"
    assert payload["data"]["message_id"] == accepted["message_id"]
    assert payload["data"]["text"] == "answer me later"
    assert payload["data"]["callback_url"] == receiver.url
    record = await chatbus.store.get_message("default", accepted["message_id"])
    assert record is not None and record.status == "completed"


async def test_an_async_chat_that_fails_delivers_the_failure(
    start_chatbus: StartChatbus, receiver: Receiver, upstream: Any
) -> None:
    upstream.behaviour.fail_status = 401
    chatbus = await start_chatbus(**async_mode(receiver))
    body = {"query": "x", "model_name": "fake", "callback_url": receiver.url}
    async with chatbus.post("/chat/chat", body) as response:
        assert response.status == 202
    await receiver.wait_for(1)
    data = receiver.payloads()[0]
    assert data["type"] == "chat.failed"
    assert data["data"]["error_type"] == "authentication_failed"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",  # not on the allowlist
        "http://localhost:1/hook",  # a name for an allowed address is not the allowed host
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "not a url",
    ],
)
async def test_a_callback_off_the_allowlist_is_a_400(
    start_chatbus: StartChatbus, receiver: Receiver, url: str
) -> None:
    chatbus = await start_chatbus(**async_mode(receiver))
    status, body = await chatbus.chat_json(query="x", callback_url=url)
    assert status == 400
    assert (body["error"]["type"], body["error"]["field"]) == (
        "callback_not_allowed",
        "callback_url",
    )
    assert "127.0.0.1" in body["error"]["message"]
    assert chatbus.events.events == []


async def test_callbacks_are_off_until_hosts_are_allowed(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    chatbus = await start_chatbus()
    status, body = await chatbus.chat_json(query="x", callback_url=receiver.url)
    assert status == 400
    assert "set [chat] callback_hosts" in body["error"]["message"]


async def test_redirects_are_never_followed(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    elsewhere = Receiver()
    app = web.Application()
    app.router.add_post("/hook", elsewhere.handle)
    runner = await start(app, "127.0.0.1", 0, grace=0.1)
    target = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    redirecting = web.Application()
    redirecting.router.add_post("/hook", redirect)
    redirector = await start(redirecting, "127.0.0.1", 0, grace=0.1)
    try:
        url = f"http://127.0.0.1:{redirector.addresses[0][1]}/hook"
        chatbus = await start_chatbus(**async_mode(receiver, callback_hosts=[urlsplit(url).netloc]))
        status, _ = await chatbus.chat_json(query="x", callback_url=url)
        assert status == 202
        stopped = await settled(chatbus, DeliveryStatus.STOPPED)
        assert stopped.last_error == "HTTP 307"
        assert elsewhere.requests == []
    finally:
        await redirector.cleanup()
        await runner.cleanup()


async def test_deliveries_are_counted_and_secrets_never_logged(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers = [500]
    with structlog.testing.capture_logs() as logs:
        chatbus = await start_chatbus(**webhooks(receiver))
        await chatbus.chat(query="count me")
        await settled(chatbus, DeliveryStatus.DELIVERED)
        async with chatbus.http.get(chatbus.url + "/metrics") as response:
            text = await response.text()
    assert 'chatbus_webhook_deliveries_total{outcome="retrying"} 1.0' in text
    assert 'chatbus_webhook_deliveries_total{outcome="delivered"} 1.0' in text
    assert SECRET not in str(logs) and SECRET.removeprefix("whsec_") not in str(logs)
    assert any(entry["event"] == "webhook attempt" for entry in logs)
