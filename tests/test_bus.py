"""core.bus.EventBus: background delivery, isolation, timeouts; core.events and their hooks;
and each lifecycle hook implemented by a plugin on a real chatbus, with what it receives."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import sqlite3
import time

import pluggy

from chatbus.testing.fake_upstream import FakeUpstream
from core import hookspecs
from core.bus import EventBus
from core.events import (
    LIFECYCLE_EVENTS,
    ChatCancelled,
    ChatCompleted,
    ChatFailed,
    ChatReceived,
    ChatStarted,
    Event,
    FeedbackReceived,
)
from core.hookspecs import PROJECT, hookimpl
from core.plugins import make_plugin_manager
from core.providers import Usage
from tests.conftest import Chatbus, StartChatbus
from tests.sse import read_sse
from tests.waiting import wait_until


def completed(message_id: str = "m1") -> ChatCompleted:
    return ChatCompleted(
        message_id=message_id,
        conversation_id="c1",
        tenant="default",
        request_id="r1",
        model="echo",
        query="hi",
        text="hi there",
        usage=None,
        latency=0.1,
        first_token_latency=None,
    )


def manager(*plugins: object) -> pluggy.PluginManager:
    pm = make_plugin_manager(builtins=False, entry_points=False)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class SyncSubscriber:
    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    def chat_completed(self, event: ChatCompleted) -> None:
        self.events.append(event)


class AsyncSubscriber:
    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    async def chat_completed(self, event: ChatCompleted) -> None:
        await asyncio.sleep(0)  # it really suspends, as async subscribers do; not a wait
        self.events.append(event)


class Raising:
    @hookimpl
    def chat_completed(self, event: ChatCompleted) -> None:
        raise RuntimeError("sync subscriber broke")


class AsyncRaising:
    @hookimpl
    async def chat_completed(self, event: ChatCompleted) -> None:
        await asyncio.sleep(0)  # it really suspends before it raises; not a wait
        raise RuntimeError("async subscriber broke")


class Hanging:
    def __init__(self) -> None:
        self.started = False
        self.cancelled = False

    @hookimpl
    async def chat_completed(self, event: ChatCompleted) -> None:
        self.started = True
        try:
            await asyncio.sleep(60)  # a subscriber that hangs: the scenario, not a wait
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_sync_and_async_subscribers_get_the_event_once() -> None:
    sync, async_ = SyncSubscriber(), AsyncSubscriber()
    bus = EventBus(manager(sync, async_), timeout=5)
    event = completed()
    bus.publish(event)
    await bus.drain()
    assert sync.events == [event]
    assert async_.events == [event]
    assert sync.events[0] is event
    await bus.drain()  # draining again delivers nothing more
    assert len(sync.events) == 1
    assert len(async_.events) == 1


async def test_every_event_is_delivered_in_order_of_publishing() -> None:
    sync = SyncSubscriber()
    bus = EventBus(manager(sync), timeout=5)
    events = [completed(f"m{i}") for i in range(20)]
    for event in events:
        bus.publish(event)
    await bus.drain()
    assert [event.message_id for event in sync.events] == [f"m{i}" for i in range(20)]


async def test_only_subscribers_of_that_hook_are_called() -> None:
    sync = SyncSubscriber()
    bus = EventBus(manager(sync), timeout=5)
    bus.publish(
        FeedbackReceived(message_id="m1", conversation_id="c1", tenant="t", score=5, reason="")
    )
    await bus.drain()
    assert sync.events == []


async def test_a_raising_subscriber_does_not_stop_others() -> None:
    sync, async_ = SyncSubscriber(), AsyncSubscriber()
    # Registered around the others, so they run both before and after them.
    bus = EventBus(manager(Raising(), AsyncRaising(), sync, async_, Raising()), timeout=5)
    event = completed()
    bus.publish(event)
    await bus.drain()
    assert sync.events == [event]
    assert async_.events == [event]


async def test_a_hanging_subscriber_is_cut_off_after_the_timeout() -> None:
    hanging, sync, async_ = Hanging(), SyncSubscriber(), AsyncSubscriber()
    bus = EventBus(manager(hanging, sync, async_), timeout=0.1)
    event = completed()
    began = time.monotonic()
    bus.publish(event)
    await bus.drain()
    elapsed = time.monotonic() - began
    assert elapsed < 2
    assert elapsed >= 0.09
    assert hanging.started
    assert hanging.cancelled
    assert sync.events == [event]
    assert async_.events == [event]


async def test_publish_does_not_wait_for_subscribers() -> None:
    sync, async_ = SyncSubscriber(), AsyncSubscriber()
    bus = EventBus(manager(sync, async_, Hanging()), timeout=0.1)
    began = time.monotonic()
    bus.publish(completed())
    assert time.monotonic() - began < 0.05
    assert async_.events == []  # awaited in a background task, not in publish
    assert len(sync.events) == 1  # a plain function is simply called
    await bus.drain()
    assert len(sync.events) == 1
    assert len(async_.events) == 1


async def test_publish_with_no_subscribers_does_nothing() -> None:
    bus = EventBus(manager(), timeout=5)
    bus.publish(completed())
    assert bus._pending == set()
    await bus.drain()


async def test_a_subscriber_may_take_no_arguments() -> None:
    calls: list[str] = []

    class NoArgs:
        @hookimpl
        def chat_completed(self) -> None:
            calls.append("sync")

    class AsyncNoArgs:
        @hookimpl
        async def chat_completed(self) -> None:
            calls.append("async")

    bus = EventBus(manager(NoArgs(), AsyncNoArgs()), timeout=5)
    bus.publish(completed())
    await bus.drain()
    assert sorted(calls) == ["async", "sync"]


async def test_a_module_function_subscriber() -> None:
    import types

    received: list[Event] = []
    module = types.ModuleType("chatbus_test_bus_module")

    @hookimpl
    def chat_failed(event: ChatFailed) -> None:
        received.append(event)

    module.chat_failed = chat_failed  # type: ignore[attr-defined]
    bus = EventBus(manager(module), timeout=5)
    event = ChatFailed(
        message_id="m1",
        conversation_id="c1",
        tenant="default",
        request_id="r1",
        model="fake",
        query="q",
        text="par",
        usage=Usage(prompt_tokens=3, completion_tokens=1),
        latency=0.2,
        first_token_latency=0.05,
        error_type="upstream_timeout",
        error_message="no data for 5 s",
    )
    bus.publish(event)
    await bus.drain()
    assert received == [event]


async def test_drain_waits_for_events_published_by_subscribers() -> None:
    """A subscriber may itself publish; drain waits for that too."""
    sync = SyncSubscriber()
    bus: EventBus

    class Republisher:
        @hookimpl
        async def chat_started(self, event: ChatStarted) -> None:
            await asyncio.sleep(0.01)  # publishes later, while drain waits: not a wait
            bus.publish(completed(event.message_id))

    bus = EventBus(manager(Republisher(), sync), timeout=5)
    bus.publish(
        ChatStarted(
            message_id="m7",
            conversation_id="c1",
            tenant="default",
            request_id="r1",
            model="echo",
            query="q",
            history_turns=0,
        )
    )
    await bus.drain()
    assert [event.message_id for event in sync.events] == ["m7"]


# Events and their hooks


def test_every_lifecycle_event_has_its_hookspec() -> None:
    pm = manager()
    hooks = {event.hook for event in LIFECYCLE_EVENTS}
    assert hooks == {
        "chat_received",
        "chat_started",
        "chat_completed",
        "chat_failed",
        "chat_cancelled",
        "feedback_received",
    }
    for event in LIFECYCLE_EVENTS:
        spec = getattr(hookspecs, event.hook)
        assert hasattr(spec, f"{PROJECT}_spec"), event.hook
        assert list(inspect.signature(spec).parameters) == ["event"]
        caller = getattr(pm.hook, event.hook)
        assert caller.spec is not None
        assert caller.spec.argnames == ("event",)


def test_lifecycle_events_are_distinct_classes_with_distinct_hooks() -> None:
    assert len(set(LIFECYCLE_EVENTS)) == len(LIFECYCLE_EVENTS) == 6
    assert {ChatReceived, ChatStarted, ChatCompleted, ChatFailed, ChatCancelled} <= set(
        LIFECYCLE_EVENTS
    )
    assert len({event.hook for event in LIFECYCLE_EVENTS}) == 6


async def test_subscribers_are_called_in_pluggys_order() -> None:
    calls: list[str] = []

    class First:
        @hookimpl(tryfirst=True)
        def chat_completed(self, event: ChatCompleted) -> None:
            calls.append("first")

    class Plain:
        @hookimpl
        def chat_completed(self, event: ChatCompleted) -> None:
            calls.append("plain")

    class Last:
        @hookimpl(trylast=True)
        def chat_completed(self, event: ChatCompleted) -> None:
            calls.append("last")

    bus = EventBus(manager(Last(), First(), Plain()), timeout=1.0)
    bus.publish(completed())
    await bus.drain()
    assert calls == ["first", "plain", "last"]


# Each lifecycle hook, implemented by a plugin of the test, on a real chatbus


class Subscriber:
    """A plugin of one test: each event its hook got, with the turn's row in the store as
    it was when the hook ran (read from the SQLite file then), or None if there was none."""

    def __init__(self) -> None:
        self.db = ""  # the chatbus's SQLite file, set once it runs
        self.seen: list[tuple[Event, sqlite3.Row | None]] = []

    def record(self, event: Event) -> None:
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            db.row_factory = sqlite3.Row
            query = "SELECT status, response, feedback_score FROM messages WHERE message_id = ?"
            row = db.execute(query, (event.message_id,)).fetchone()
        self.seen.append((event, row))

    async def got(self, count: int = 1) -> list[tuple[Event, sqlite3.Row | None]]:
        """The `count` events it got (waiting for them), and no more."""
        await wait_until(lambda: len(self.seen) >= count, f"{count} events")
        assert len(self.seen) == count
        return self.seen


async def running(start_chatbus: StartChatbus, subscriber: Subscriber) -> Chatbus:
    """A chatbus with `subscriber` registered, which then knows its store's file."""
    chatbus = await start_chatbus(subscriber)
    subscriber.db = chatbus.store.path  # type: ignore[attr-defined]
    return chatbus


class OnChatReceived(Subscriber):
    @hookimpl
    def chat_received(self, event: ChatReceived) -> None:
        self.record(event)


async def test_chat_received_has_the_request_before_anything_is_stored(
    start_chatbus: StartChatbus,
) -> None:
    subscriber = OnChatReceived()
    chatbus = await running(start_chatbus, subscriber)
    before = time.time()
    body = {"query": "hello hooks", "conversation_id": "c1", "stream": True}
    headers = {"X-Request-Id": "req-received"}
    async with chatbus.http.post(chatbus.url + "/chat/chat", json=body, headers=headers) as r:
        stream = await read_sse(r)
    ((event, row),) = await subscriber.got()
    assert isinstance(event, ChatReceived)
    assert {event.message_id} == stream.message_ids
    assert (event.conversation_id, event.tenant, event.request_id) == (
        "c1",
        "default",
        "req-received",
    )
    assert (event.model, event.query, event.stream, event.callback_url) == (
        "echo",
        "hello hooks",
        True,
        None,
    )
    assert before <= event.at <= time.time()
    assert row is None  # nothing stored yet


class OnChatStarted(Subscriber):
    @hookimpl
    def chat_started(self, event: ChatStarted) -> None:
        self.record(event)


async def test_chat_started_comes_once_the_turn_is_stored_with_its_history(
    start_chatbus: StartChatbus,
) -> None:
    subscriber = OnChatStarted()
    chatbus = await running(start_chatbus, subscriber)
    await chatbus.chat(query="first", conversation_id="c1")
    second = await chatbus.chat(
        query="second", conversation_id="c1", history_len=5, model_name="fake"
    )
    (_, (event, row)) = await subscriber.got(2)
    assert isinstance(event, ChatStarted)
    assert {event.message_id} == second.message_ids
    assert (event.conversation_id, event.tenant, event.model, event.query) == (
        "c1",
        "default",
        "fake",
        "second",
    )
    assert event.history_turns == 1  # the first turn, read from the store
    assert event.request_id
    assert row is not None and (row["status"], row["response"]) == ("streaming", "")


class OnChatCompleted(Subscriber):
    @hookimpl
    def chat_completed(self, event: ChatCompleted) -> None:
        self.record(event)


async def test_chat_completed_has_the_whole_answer_once_it_is_stored(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = ["Hel", "lo ", "hooks"]
    subscriber = OnChatCompleted()
    chatbus = await running(start_chatbus, subscriber)
    stream = await chatbus.chat(query="say it", conversation_id="c1", model_name="fake")
    ((event, row),) = await subscriber.got()
    assert isinstance(event, ChatCompleted)
    assert {event.message_id} == stream.message_ids
    assert (event.conversation_id, event.tenant, event.model, event.query) == (
        "c1",
        "default",
        "fake",
        "say it",
    )
    assert event.text == stream.text == "Hello hooks"
    assert event.usage == Usage(prompt_tokens=2, completion_tokens=3)  # as the upstream said
    assert event.first_token_latency is not None
    assert 0 <= event.first_token_latency <= event.latency
    assert row is not None and (row["status"], row["response"]) == ("completed", "Hello hooks")


class OnChatFailed(Subscriber):
    @hookimpl
    def chat_failed(self, event: ChatFailed) -> None:
        self.record(event)


async def test_chat_failed_says_why_once_the_record_says_failed(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = ["par", "tial", " answer"]
    upstream.behaviour.break_after = 2  # the connection drops after two pieces
    subscriber = OnChatFailed()
    chatbus = await running(start_chatbus, subscriber)
    stream = await chatbus.chat(query="break", conversation_id="c1", model_name="fake")
    ((event, row),) = await subscriber.got()
    assert isinstance(event, ChatFailed)
    assert {event.message_id} == stream.message_ids
    assert (event.conversation_id, event.tenant, event.model, event.query) == (
        "c1",
        "default",
        "fake",
        "break",
    )
    assert event.text == "partial"  # what the client had when it broke
    assert event.error_type == stream.frames[-1]["error"]["type"] == "upstream_unavailable"
    assert event.error_message
    assert row is not None and (row["status"], row["response"]) == ("failed", "partial")


class OnChatCancelled(Subscriber):
    @hookimpl
    def chat_cancelled(self, event: ChatCancelled) -> None:
        self.record(event)


async def test_chat_cancelled_keeps_the_partial_answer(
    start_chatbus: StartChatbus, upstream: FakeUpstream
) -> None:
    upstream.behaviour.tokens = [f"t{i} " for i in range(200)]
    upstream.behaviour.delay = 0.02
    subscriber = OnChatCancelled()
    chatbus = await running(start_chatbus, subscriber)
    body = {"query": "go", "conversation_id": "c1", "model_name": "fake", "stream": True}
    seen = ""
    async with chatbus.post("/chat/chat", body) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                frame = json.loads(line[6:])
                seen += frame["text"]
                if seen == "t0 t1 ":
                    break  # the client goes away mid-answer
    ((event, row),) = await subscriber.got()
    assert isinstance(event, ChatCancelled)
    assert event.message_id == frame["message_id"]
    assert (event.conversation_id, event.tenant, event.model, event.query) == (
        "c1",
        "default",
        "fake",
        "go",
    )
    assert event.text.startswith(seen) and len(event.text) < len("".join(upstream.behaviour.tokens))
    assert event.first_token_latency is not None
    assert row is not None and (row["status"], row["response"]) == ("cancelled", event.text)


class OnFeedbackReceived(Subscriber):
    @hookimpl
    async def feedback_received(self, event: FeedbackReceived) -> None:  # awaited by the bus
        self.record(event)


async def test_feedback_received_has_the_rating_once_it_is_stored(
    start_chatbus: StartChatbus,
) -> None:
    subscriber = OnFeedbackReceived()
    chatbus = await running(start_chatbus, subscriber)
    stream = await chatbus.chat(query="rate me", conversation_id="c1")
    (message_id,) = stream.message_ids
    feedback = {"message_id": message_id, "score": 90, "reason": "nice"}
    async with chatbus.post("/chat/feedback", feedback) as response:
        assert response.status == 200
    ((event, row),) = await subscriber.got()
    assert isinstance(event, FeedbackReceived)
    assert (event.message_id, event.conversation_id, event.tenant) == (message_id, "c1", "default")
    assert (event.score, event.reason) == (90, "nice")
    assert row is not None and row["feedback_score"] == 90
