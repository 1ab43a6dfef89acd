"""Signed webhooks through the durable outbox (plugins/transports/webhook), delivered to real
receivers on loopback and verified with the standardwebhooks package."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook

from core.app import create_app, make_store, open_service
from core.chat import Caller
from core.chat_input import ChatInput
from core.config import Config, ConfigError
from core.config_sources import load_config
from core.errors import CallbackNotAllowed
from core.events import ChatCompleted, Event
from core.history import HistoryStore
from core.hookspecs import hookimpl
from core.keys import CONFIG
from core.outbox import Delivery, DeliveryStatus, Outbox
from core.plugins import make_plugin_manager
from core.server import start
from plugins.history_sqlite.store import SqliteStore
from plugins.transports.webhook import options
from plugins.transports.webhook.deliverer import Deliverer
from tests.conftest import Chatbus, StartChatbus, make_config, webhook_settings
from tests.waiting import wait_until

pytestmark = pytest.mark.both_stores  # every test that starts a chatbus: SQLite and MongoDB

SECRET = "whsec_" + base64.b64encode(b"chatbus-test-secret-0123456789ab").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"chatbus-old-secret-0123456789abc").decode()
FAST = {"schedule": [0.05, 0.05, 0.05], "poll_seconds": 0.05, "timeout_seconds": 0.5}


@dataclass
class Receiver:
    """A webhook receiver: answers with `answers` in turn (then 200), after `delay`, and once
    `gate` is open (30 s at most); a failure carries `retry_after` when it is set."""

    answers: list[int] = field(default_factory=list)
    delay: float = 0.0
    retry_after: str | None = None
    gate: asyncio.Event | None = None
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most_in_flight: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        self.arrived.set()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)  # a slow receiver: the scenario, not a wait
            if self.gate is not None:
                async with asyncio.timeout(30):
                    await self.gate.wait()
        finally:
            self.in_flight -= 1
        status = self.answers.pop(0) if self.answers else 200
        retry_after = self.retry_after if status >= 300 else None
        return web.Response(
            status=status, headers={"Retry-After": retry_after} if retry_after is not None else None
        )

    def payloads(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.requests]

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def listening(hook: Receiver) -> AsyncIterator[Receiver]:
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = await start(app, "127.0.0.1", 0)
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield hook
    finally:
        if hook.gate is not None:
            hook.gate.set()  # let held requests go, so the server stops at once
        await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with listening(Receiver()) as hook:
        yield hook


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)


def webhooks(receiver: Receiver, **endpoint: Any) -> dict[str, Any]:
    endpoints = [{"url": receiver.url, "secret_env": "HOOK_SECRET", **endpoint}]
    return webhook_settings(endpoints=endpoints, delivery=FAST)


async def outbox(chatbus: Chatbus, status: DeliveryStatus | None = None) -> list[Any]:
    return await chatbus.store.outbox.deliveries(status, 100)


async def settled(chatbus: Chatbus, status: DeliveryStatus) -> Any:
    """The first delivery to reach `status` (polling the store: 5 s at most)."""
    found = await wait_until(lambda: outbox(chatbus, status), f"a delivery {status}")
    return found[0]


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
    await asyncio.sleep(0.2)  # no other delivery within 0.2 s: a check, not a wait
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
    with structlog.testing.capture_logs() as logs:
        await chatbus.chat(query="never")
        dead = await settled(chatbus, DeliveryStatus.DEAD)
    assert (dead.attempts, dead.last_error) == (4, "HTTP 500")  # the first, then 3 retries
    assert len(receiver.requests) == 4
    attempts = [(line["outcome"], line["log_level"]) for line in logs if "outcome" in line]
    assert attempts == [("pending", "info")] * 3 + [("dead", "warning")]  # #16.10


async def test_a_receiver_answering_410_stops_it(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers = [410]
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="gone")
    stopped = await settled(chatbus, DeliveryStatus.STOPPED)
    assert (stopped.attempts, stopped.last_error) == (1, "HTTP 410")
    await asyncio.sleep(0.2)  # no attempt after it within 0.2 s: a check, not a wait
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
    config["plugins"]["webhooks"]["delivery"] = {
        **FAST,
        "schedule": [0.05, 0.05, 1.0],
    }  # due after the restart
    first = await start_chatbus(**config)
    await first.chat(query="survive")
    await receiver.wait_for(3)
    await first.close()  # the delivery is pending in the store file
    (pending,) = await _pending_in(first)
    second = await start_chatbus(**webhooks(receiver, events=["chat_completed"]))
    await receiver.wait_for(4)
    await settled(second, DeliveryStatus.DELIVERED)
    await asyncio.sleep(0.2)  # no attempt after it within 0.2 s: a check, not a wait
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert ids == [pending.delivery_id] * 4
    assert [h["webhook-id"] for h, _ in receiver.requests[3:]] == [pending.delivery_id]


async def _pending_in(bus: Chatbus) -> list[Any]:
    """The pending deliveries of a chatbus that has stopped, read from its store anew."""
    config = bus.app[CONFIG]
    store = make_store(config, make_plugin_manager(config.plugins.modules))
    await store.open()
    try:
        return await store.outbox.deliveries(DeliveryStatus.PENDING, 10)
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
    await wait_until(delivered(one.store, 10), "all ten recorded delivered")
    await asyncio.sleep(0.3)  # no second attempt of any within 0.3 s: a check, not a wait
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert len(ids) == len(set(ids)) == 10
    assert len(await outbox(one, DeliveryStatus.DELIVERED)) == 10


async def test_a_secret_gone_after_start_up_is_retried_not_sent_unsigned(
    start_chatbus: StartChatbus, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    chatbus = await start_chatbus(**webhooks(receiver))
    monkeypatch.delenv("HOOK_SECRET")
    with structlog.testing.capture_logs() as logs:
        await chatbus.chat(query="unsigned")
        dead = await settled(chatbus, DeliveryStatus.DEAD)
    levels = {line["log_level"] for line in logs if line["event"] == "webhook attempt"}
    assert levels == {"warning"}  # every attempt: someone has to set the secret (#16.10)
    assert dead.last_error == "the environment variable HOOK_SECRET is not set"
    assert receiver.requests == []
    assert SECRET not in str(dead) and "HOOK_SECRET" in str(dead)
    assert os.environ.get("HOOK_SECRET") is None


async def test_no_delivery_counts_at_shutdown_when_nothing_was_attempted(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    """#16.10: without webhooks, a shutdown says nothing of them; with one, it counts."""
    quiet = await start_chatbus()
    await quiet.chat(query="no webhooks here")
    with structlog.testing.capture_logs() as logs:
        await quiet.close()
    assert [line for line in logs if line["event"] == "webhook deliveries"] == []
    busy = await start_chatbus(**webhooks(receiver))
    await busy.chat(query="one webhook")
    await settled(busy, DeliveryStatus.DELIVERED)
    with structlog.testing.capture_logs() as logs:
        await busy.close()
    (counts,) = [line for line in logs if line["event"] == "webhook deliveries"]
    assert counts["delivered"] == 1


def test_plan_deliveries_for_subscribed_endpoints_only(tmp_path: Any) -> None:
    config = make_config(
        tmp_path,
        **webhook_settings(
            endpoints=[
                {"url": "http://127.0.0.1:1/a", "secret_env": "HOOK_SECRET"},
                {"url": "http://127.0.0.1:1/b", "secret_env": "B", "events": ["chat_started"]},
            ]
        ),
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


class AuditPlanner:
    """A plugin of the test that plans a delivery of its own for each completed chat: an
    audit record to `url`, signed with HOOK_SECRET's secret."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.asked: list[tuple[str, str]] = []  # (the event's hook, the config's default model)

    @hookimpl
    def plan_deliveries(self, event: Event, config: Config) -> list[Delivery] | None:
        self.asked.append((event.hook, config.default_model))
        if not isinstance(event, ChatCompleted):
            return None
        payload = {"type": "audit", "message_id": event.message_id, "text": event.text}
        return [
            Delivery(delivery_id=f"msg_audit_{event.message_id}", url=self.url, event_type="audit",
                     payload=orjson.dumps(payload).decode(), secret_env="HOOK_SECRET",
                     message_id=event.message_id, next_attempt_at=event.at, created_at=event.at)
        ]  # fmt: skip


async def test_a_plugins_planned_delivery_is_written_and_delivered(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    planner = AuditPlanner(receiver.url)
    chatbus = await start_chatbus(planner, **webhook_settings(delivery=FAST))  # its own only
    stream = await chatbus.chat(query="audit me")
    (message_id,) = stream.message_ids
    await receiver.wait_for(1)
    headers, body = receiver.requests[0]
    assert Webhook(SECRET).verify(body, headers) == {
        "type": "audit",
        "message_id": message_id,
        "text": "audit me",
    }
    assert headers["webhook-id"] == f"msg_audit_{message_id}"
    delivered = await settled(chatbus, DeliveryStatus.DELIVERED)
    assert (delivered.delivery_id, delivered.event_type, delivered.message_id) == (
        f"msg_audit_{message_id}",
        "audit",
        message_id,
    )
    # Asked for every lifecycle event of the chat, in order, with the running config.
    assert planner.asked == [
        ("chat_received", "echo"),
        ("chat_started", "echo"),
        ("chat_completed", "echo"),
    ]


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
    config = make_config(
        tmp_path, **webhook_settings(endpoints=[{"url": "ftp://x", "secret_env": "S"}])
    )
    with pytest.raises(
        ConfigError,
        match=r"^plugins\.webhooks\.endpoints\.0\.url: must start with http:// or https://$",
    ):
        create_app(config)


@pytest.mark.parametrize(
    ("delivery", "problem"),
    [
        ({"poll_seconds": math.inf}, "poll_seconds: Input should be a finite number"),
        ({"schedule": [5, math.nan]}, "schedule.1: Input should be a finite number"),
        ({"schedule": [-1]}, "schedule.0: Input should be greater than or equal to 0"),
    ],
)
def test_a_delay_the_loop_cannot_sleep_on_is_a_config_error(
    tmp_path: Any, delivery: dict[str, Any], problem: str
) -> None:
    config = make_config(tmp_path, **webhook_settings(delivery=delivery))
    with pytest.raises(ConfigError, match=rf"^plugins\.webhooks\.delivery\.{re.escape(problem)}$"):
        create_app(config)


# Async mode: callback_url


def async_mode(receiver: Receiver, **chat: Any) -> dict[str, Any]:
    allowed = [urlsplit(receiver.url).netloc]  # 127.0.0.1:<port>: a bare host means port 80
    settings = {"callback_hosts": allowed, "callback_secret_env": "HOOK_SECRET", **chat}
    return webhook_settings(**settings, delivery=FAST)


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
    assert "set [plugins.webhooks] callback_hosts" in body["error"]["message"]


async def test_redirects_are_never_followed(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    elsewhere = Receiver()
    app = web.Application()
    app.router.add_post("/hook", elsewhere.handle)
    runner = await start(app, "127.0.0.1", 0)
    target = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(target)

    redirecting = web.Application()
    redirecting.router.add_post("/hook", redirect)
    redirector = await start(redirecting, "127.0.0.1", 0)
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


# Retry-After from receivers, a loop that never dies, and no head-of-line blocking


def delivery_to(url: str, due: float) -> Delivery:
    """A delivery written straight to the outbox, as the chat service would."""
    return Delivery(delivery_id=f"msg_{uuid.uuid4().hex}", url=url, event_type="chat.completed",
                    payload='{"type": "chat.completed"}', secret_env="HOOK_SECRET",
                    next_attempt_at=due, created_at=due)  # fmt: skip


def delivered(store: HistoryStore, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await store.outbox.deliveries(DeliveryStatus.DELIVERED, 1000)) >= count

    return check


@pytest.mark.parametrize(
    "retry_after", ["nan", "inf", "-inf", "Sun, 06 Nov 1994 08:49:37 GMT", "soon"]
)
async def test_a_receivers_unusable_retry_after_leaves_its_schedule(
    start_chatbus: StartChatbus, receiver: Receiver, retry_after: str
) -> None:
    receiver.answers, receiver.retry_after = [503], retry_after
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="first")
    first = await settled(chatbus, DeliveryStatus.DELIVERED)
    assert first.attempts == 2 and math.isfinite(first.next_attempt_at)
    await chatbus.chat(query="later")  # the loop goes on
    await receiver.wait_for(3)
    assert [p["data"]["query"] for p in receiver.payloads()] == ["first", "first", "later"]


async def test_a_receivers_retry_after_is_capped(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers, receiver.retry_after = [503, 429], "1" + "0" * 400
    config = webhooks(receiver)
    config["plugins"]["webhooks"]["delivery"] = {**FAST, "max_retry_after_seconds": 0.05}
    chatbus = await start_chatbus(**config)
    await chatbus.chat(query="capped")
    assert (await settled(chatbus, DeliveryStatus.DELIVERED)).attempts == 3


async def test_a_receiver_is_waited_for_an_hour_at_most_by_default(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    receiver.answers, receiver.retry_after = [503], "99999"
    chatbus = await start_chatbus(**webhooks(receiver))
    await chatbus.chat(query="later")

    async def retrying() -> bool:
        return any(d.attempts == 1 for d in await outbox(chatbus, DeliveryStatus.PENDING))

    await wait_until(retrying, "the first attempt recorded", timeout=10)
    (pending,) = await outbox(chatbus, DeliveryStatus.PENDING)
    assert 3500 < pending.next_attempt_at - time.time() <= 3600


async def test_a_secret_that_cannot_sign_fails_its_delivery_not_the_loop(
    start_chatbus: StartChatbus, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKEN_SECRET", "whsec_!!!")  # decodes to nothing: the signer raises
    endpoints = [
        {"url": receiver.url, "secret_env": "BROKEN_SECRET"},
        {"url": receiver.url, "secret_env": "HOOK_SECRET"},
    ]
    chatbus = await start_chatbus(**webhook_settings(endpoints=endpoints, delivery=FAST))
    await chatbus.chat(query="first")
    dead = await settled(chatbus, DeliveryStatus.DEAD)
    assert dead.attempts == 4 and dead.last_error.startswith("EmptyWebhookSecretError: ")
    await chatbus.chat(query="later")
    await receiver.wait_for(2)
    assert [p["data"]["query"] for p in receiver.payloads()] == ["first", "later"]


class SettleFailsOnce:
    """A real outbox whose first `settle_delivery` raises, as a store bug would."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.outbox, name)

    async def settle_delivery(self, delivery: Delivery) -> bool:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a store bug")
        return await self.outbox.settle_delivery(delivery)


async def test_a_store_error_while_recording_does_not_end_the_loop(
    tmp_path: Path, receiver: Receiver
) -> None:
    store = SqliteStore(str(tmp_path / "outbox.db"))
    await store.open()
    settings = options.Delivery.model_validate({**FAST, "lease_seconds": 0.5})
    deliverer = Deliverer(
        cast(Outbox, SettleFailsOnce(store.outbox)), settings, CollectorRegistry()
    )
    first = delivery_to(receiver.url, time.time())
    await store.outbox.add_deliveries([first])
    await deliverer.start()
    try:
        await receiver.wait_for(1)  # sent, but not recorded: it stays leased
        later = delivery_to(receiver.url, time.time())
        await store.outbox.add_deliveries([later])
        await wait_until(delivered(store, 2), "both delivered", timeout=10)
    finally:
        await deliverer.stop()
        await store.close()
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert ids.count(later.delivery_id) == 1
    assert ids.count(first.delivery_id) == 2  # sent again once its lease ran out


async def test_a_slow_destination_does_not_hold_up_the_others(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    async with listening(Receiver(gate=asyncio.Event())) as slow:
        settings = {**FAST, "timeout_seconds": 30, "per_destination": 4}
        chatbus = await start_chatbus(**webhook_settings(delivery=settings))
        now = time.time()
        backlog = [delivery_to(slow.url, now - 1) for _ in range(40)]  # due before the fast one
        await chatbus.store.outbox.add_deliveries([*backlog, delivery_to(receiver.url, now)])
        await receiver.wait_for(1)  # while the slow receiver holds every request it got
        await wait_until(delivered(chatbus.store, 1), "the fast one recorded", timeout=10)
        await slow.wait_for(4)
        assert slow.in_flight == 4
        assert slow.gate is not None
        slow.gate.set()
        await wait_until(delivered(chatbus.store, 41), "the backlog delivered", timeout=10)
    assert slow.most_in_flight == 4 and len(slow.requests) == 40


async def test_no_more_in_flight_than_the_concurrency(start_chatbus: StartChatbus) -> None:
    async with (
        listening(Receiver(gate=asyncio.Event())) as one,
        listening(Receiver(gate=asyncio.Event())) as two,
    ):
        settings = {**FAST, "timeout_seconds": 30, "concurrency": 5, "per_destination": 4}
        chatbus = await start_chatbus(**webhook_settings(delivery=settings))
        now = time.time()
        await chatbus.store.outbox.add_deliveries(
            [delivery_to(hook.url, now) for hook in (one, two) for _ in range(6)]
        )

        async def five_held() -> bool:
            return one.in_flight + two.in_flight == 5

        await wait_until(five_held, "five requests held", timeout=10)
        await asyncio.sleep(0.3)  # room for a wrong deliverer to start more: not a wait
        assert one.in_flight + two.in_flight == 5
        for hook in (one, two):
            assert hook.gate is not None
            hook.gate.set()
        await wait_until(delivered(chatbus.store, 12), "all delivered", timeout=10)
    assert max(one.most_in_flight, two.most_in_flight) <= 4


# The deliverer's stop, whatever the store: on SQLite only (on MongoDB its close once ran
# past the 5 s bound in a full run, not yet explained).
@pytest.mark.parametrize("store_backend", ["sqlite"], indirect=True)
async def test_stop_leaves_attempts_in_flight_to_their_lease(start_chatbus: StartChatbus) -> None:
    async with listening(Receiver(gate=asyncio.Event())) as held:
        settings = {**FAST, "timeout_seconds": 30, "lease_seconds": 0.5}
        first = await start_chatbus(**webhook_settings(delivery=settings))
        sent = delivery_to(held.url, time.time())
        await first.store.outbox.add_deliveries([sent])
        await held.wait_for(1)
        async with asyncio.timeout(5):
            await first.close()  # does not wait for the answer
        (left,) = await _pending_in(first)
        assert (left.delivery_id, left.attempts) == (sent.delivery_id, 0)
        assert held.gate is not None
        held.gate.set()
        second = await start_chatbus(**webhook_settings(delivery=settings))
        await wait_until(delivered(second.store, 1), "delivered by the next instance", timeout=10)


# The plugin's settings: [plugins.webhooks]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"endpoints": [{"url": "http://127.0.0.1:9/", "secret_env": "UNSET_SECRET"}]},
         "plugins.webhooks.endpoints.0.secret_env: the environment variable UNSET_SECRET"
         " is not set"),
        ({"callback_hosts": ["127.0.0.1:9"], "callback_secret_env": "UNSET_SECRET"},
         "plugins.webhooks.callback_secret_env: the environment variable UNSET_SECRET"
         " is not set"),
    ],
)  # fmt: skip
def test_a_secret_the_settings_need_is_required_at_start_up(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], problem: str
) -> None:
    monkeypatch.setenv("UNSET_SECRET", " ")  # blank counts as unset
    config = make_config(tmp_path, **webhook_settings(**settings))
    with pytest.raises(ConfigError) as info:
        create_app(config)
    assert str(info.value) == problem


def test_no_callback_secret_is_needed_while_no_host_may_be_called_back(tmp_path: Any) -> None:
    create_app(make_config(tmp_path, **webhook_settings(callback_secret_env="UNSET_SECRET")))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("hooks.example:http", "is not a host or host:port"),
        ("[::1]:70000", "the port must be 1 to 65535"),
        (":8080", "names no host"),
    ],
)
def test_a_bad_callback_host_is_a_config_error(tmp_path: Any, entry: str, problem: str) -> None:
    config = make_config(tmp_path, **webhook_settings(callback_hosts=["ok.example", entry]))
    with pytest.raises(ConfigError, match=r"^plugins\.webhooks\.callback_hosts: ") as info:
        create_app(config)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ('[[webhooks]]\nurl = "http://h/"\nsecret_env = "S"\n',
         "webhooks: moved to [[plugins.webhooks.endpoints]]"),
        ("[webhook_delivery]\npoll_seconds = 1\n",
         "webhook_delivery: moved to [plugins.webhooks.delivery]"),
        ('[chat]\ncallback_hosts = ["h"]\n',
         "chat.callback_hosts: moved to [plugins.webhooks] callback_hosts"),
    ],
)  # fmt: skip
def test_the_keys_of_earlier_versions_say_where_they_moved(
    tmp_path: Path, table: str, where: str
) -> None:
    file = tmp_path / "old.toml"
    file.write_text(table)
    with pytest.raises(ConfigError) as info:
        load_config(file, {})
    assert str(info.value) == f"{file}: {where}"


async def test_without_the_webhook_plugin_no_callback_is_accepted(tmp_path: Any) -> None:
    pm = make_plugin_manager(entry_points=False)
    pm.unregister(name="plugins.transports.webhook")
    config = make_config(tmp_path)
    async with open_service(config, pm) as service:
        request = ChatInput(query="x", callback_url="http://127.0.0.1:9/")
        with pytest.raises(CallbackNotAllowed, match="no plugin here delivers callbacks"):
            async with service.start(request, Caller(request_id="r")):
                pass


class NoAdmin:
    """A plugin with a rule of its own for callbacks, on top of callback_hosts."""

    @hookimpl
    def check_callback(self, url: str, config: Config) -> str | None:
        return "no callbacks to /admin" if urlsplit(url).path.startswith("/admin") else None


async def test_a_plugin_adds_its_own_rule_for_callbacks(
    start_chatbus: StartChatbus, receiver: Receiver
) -> None:
    chatbus = await start_chatbus(NoAdmin(), **async_mode(receiver))
    status, body = await chatbus.chat_json(
        query="x", callback_url=receiver.url.replace("/hook", "/admin")
    )
    assert status == 400
    assert body["error"]["message"] == "callback_url: no callbacks to /admin"
    status, body = await chatbus.chat_json(query="call me", callback_url=receiver.url)
    assert status == 202
    await receiver.wait_for(1)
    assert orjson.loads(receiver.requests[0][1])["data"]["text"] == "call me"
