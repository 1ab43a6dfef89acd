"""core.bus.EventBus: background delivery, isolation, timeouts; core.events and their hooks."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time

import pluggy
import pytest

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
        await asyncio.sleep(0)
        self.events.append(event)


class Raising:
    @hookimpl
    def chat_completed(self, event: ChatCompleted) -> None:
        raise RuntimeError("sync subscriber broke")


class AsyncRaising:
    @hookimpl
    async def chat_completed(self, event: ChatCompleted) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async subscriber broke")


class Hanging:
    def __init__(self) -> None:
        self.started = False
        self.cancelled = False

    @hookimpl
    async def chat_completed(self, event: ChatCompleted) -> None:
        self.started = True
        try:
            await asyncio.sleep(60)
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
            await asyncio.sleep(0.01)
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


@pytest.mark.parametrize(
    "event",
    [
        ChatReceived(
            message_id="m",
            conversation_id="c",
            tenant="t",
            request_id="r",
            model="echo",
            query="q",
            stream=True,
        ),
        completed("m"),
        ChatCancelled(
            message_id="m",
            conversation_id="c",
            tenant="t",
            request_id="r",
            model="echo",
            query="q",
            text="pa",
            usage=None,
            latency=0.3,
            first_token_latency=0.1,
        ),
        FeedbackReceived(message_id="m", conversation_id="c", tenant="t", score=90, reason="ok"),
    ],
    ids=lambda event: type(event).__name__,
)
def test_events_are_frozen(event: Event) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.message_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.tenant = "other"  # type: ignore[misc]
    assert event.message_id == "m"


def test_events_take_keywords_only_and_stamp_the_time() -> None:
    with pytest.raises(TypeError):
        # Positional on purpose: the call must fail, as mypy says it does.
        ChatCompleted("m", "c", "t", "r", "echo", "q", "text", None, 0.1, None)  # type: ignore[call-arg, arg-type]
    before = time.time()
    event = completed()
    assert before <= event.at <= time.time()
    assert event.hook == "chat_completed"


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
