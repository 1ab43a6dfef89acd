"""The contract every history store fulfils, as a test class: a store plugin runs it with
its own fixture named `store` (an opened store, on a fresh database, closed afterwards):

    from chatbus.testing.store_contract import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def store(self, tmp_path):
            store = MyStore(tmp_path / "x")
            await store.open()
            yield store
            await store.close()

Needs pytest and pytest-asyncio (`asyncio_mode = "auto"`). chatbus runs it on SQLite and
on a MongoDB-compatible server (tests/test_history_stores.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest

from core.config import MAX_ANSWER_CHARS
from core.history import Conversation, HistoryStore, MessageRecord, Outcome, Status, Turn
from core.outbox import Delivery, DeliveryStatus
from core.providers import Usage


def record(message_id: str, query: str = "q", **fields: Any) -> MessageRecord:
    base = MessageRecord(
        message_id=message_id,
        conversation_id="c1",
        query=query,
        model="echo",
        created_at=1_700_000_000.0,
    )
    return replace(base, **fields)


def done(response: str, status: Status = Status.COMPLETED, **fields: Any) -> Outcome:
    return replace(Outcome(response=response, status=status, usage=None, latency=0.5), **fields)


async def add_turn(
    store: HistoryStore, message_id: str, query: str, response: str, **fields: Any
) -> None:
    await store.add_message(record(message_id, query, **fields))
    await store.finish_message(message_id, done(response))


def delivery(delivery_id: str, **fields: Any) -> Delivery:
    base = Delivery(
        delivery_id=delivery_id,
        url="http://127.0.0.1:1/hook",
        event_type="chat.completed",
        payload='{"type": "chat.completed"}',
        secret_env="HOOK_SECRET",
        message_id="m1",
        next_attempt_at=100.0,
        created_at=100.0,
    )
    return replace(base, **fields)


def _summary(conversation: Conversation) -> tuple[str, int, str, float, float]:
    c = conversation
    return (c.conversation_id, c.turns, c.first_query, c.created_at, c.updated_at)


async def _recount(
    store: HistoryStore, tenant: str, listed: list[Conversation]
) -> list[tuple[str, int, str, float, float]]:
    """The summaries of the listed conversations, counted from their turns."""
    counted = []
    for conversation in listed:
        turns = await store.messages(tenant, conversation.conversation_id, 1000, 0)
        times = [turn.created_at for turn in turns]
        counted.append((conversation.conversation_id, len(turns), turns[0].query, min(times),
                        max(times)))  # fmt: skip
    return counted


class StoreContract:
    """What every store does; subclass it and give it a `store` fixture."""

    async def test_add_then_get(self, store: HistoryStore) -> None:
        added = record(
            "m1",
            "hello",
            tenant="acme",
            chat_type="agent_chat",
            meta={"client": "curl", "tags": ["a", 1, None]},
            created_at=1_700_000_123.456789,
        )
        await store.add_message(added)
        got = await store.get_message("acme", "m1")
        assert got == MessageRecord(
            message_id="m1",
            conversation_id="c1",
            query="hello",
            model="echo",
            tenant="acme",
            chat_type="agent_chat",
            response="",
            status=Status.STREAMING,
            usage=None,
            latency=None,
            error=None,
            feedback_score=-1,
            feedback_reason="",
            meta={"client": "curl", "tags": ["a", 1, None]},
            created_at=1_700_000_123.456789,
        )
        assert got.status is Status.STREAMING

    async def test_get_unknown_is_none(self, store: HistoryStore) -> None:
        assert await store.get_message("default", "nope") is None

    async def test_finish_message_completed(self, store: HistoryStore) -> None:
        await store.add_message(record("m1"))
        await store.finish_message(
            "m1",
            Outcome(
                response="the answer",
                status=Status.COMPLETED,
                usage=Usage(prompt_tokens=12, completion_tokens=34),
                latency=1.25,
            ),
        )
        got = await store.get_message("default", "m1")
        assert got is not None
        assert got.response == "the answer"
        assert got.status is Status.COMPLETED
        assert got.usage == Usage(prompt_tokens=12, completion_tokens=34)
        assert got.latency == 1.25
        assert got.error is None
        assert got.query == "q"  # the rest is untouched
        assert got.feedback_score == -1

    async def test_finish_message_failed(self, store: HistoryStore) -> None:
        await store.add_message(record("m1"))
        await store.finish_message(
            "m1",
            Outcome(
                response="partial",
                status=Status.FAILED,
                usage=Usage(prompt_tokens=5, completion_tokens=None),
                latency=0.75,
                error="upstream_timeout",
            ),
        )
        got = await store.get_message("default", "m1")
        assert got is not None
        assert (got.response, got.status, got.usage, got.latency, got.error) == (
            "partial",
            Status.FAILED,
            Usage(prompt_tokens=5, completion_tokens=None),
            0.75,
            "upstream_timeout",
        )

    async def test_finish_message_touches_only_that_message(self, store: HistoryStore) -> None:
        await store.add_message(record("m1"))
        await store.add_message(record("m2"))
        await store.finish_message("m2", done("two"))
        one = await store.get_message("default", "m1")
        assert one is not None
        assert (one.response, one.status, one.latency) == ("", Status.STREAMING, None)

    async def test_recent_turns_last_n_oldest_first(self, store: HistoryStore) -> None:
        for i in range(5):
            await add_turn(store, f"m{i}", f"q{i}", f"a{i}")
        assert await store.recent_turns("default", "c1", 3) == [
            Turn("q2", "a2"),
            Turn("q3", "a3"),
            Turn("q4", "a4"),
        ]
        assert await store.recent_turns("default", "c1", 100) == [
            Turn(f"q{i}", f"a{i}") for i in range(5)
        ]
        assert await store.recent_turns("default", "c1", 1) == [Turn("q4", "a4")]
        assert await store.recent_turns("default", "c1", 0) == []

    async def test_recent_turns_skips_unreadable_turns(self, store: HistoryStore) -> None:
        await add_turn(store, "m0", "q0", "a0")
        await add_turn(store, "empty", "q-empty", "")  # completed, but nothing was said
        await store.add_message(record("failed", "q-failed"))
        await store.finish_message("failed", done("half", Status.FAILED, error="upstream_error"))
        await store.add_message(record("streaming", "q-streaming"))  # still running
        await store.add_message(record("cancelled", "q-cancelled"))
        await store.finish_message("cancelled", done("what they saw", Status.CANCELLED))
        await store.add_message(record("cancelled-empty", "q-ce"))
        await store.finish_message("cancelled-empty", done("", Status.CANCELLED))
        await add_turn(store, "m1", "q1", "a1")
        assert await store.recent_turns("default", "c1", 10) == [
            Turn("q0", "a0"),
            Turn("q-cancelled", "what they saw"),
            Turn("q1", "a1"),
        ]
        # The limit counts readable turns, not rows.
        assert await store.recent_turns("default", "c1", 2) == [
            Turn("q-cancelled", "what they saw"),
            Turn("q1", "a1"),
        ]

    async def test_recent_turns_keeps_insertion_order_with_identical_created_at(
        self,
        store: HistoryStore,
    ) -> None:
        # Ids that sort differently from the insertion order, and one shared timestamp.
        ids = [f"{(i * 7919) % 1000:03d}-{i}" for i in range(60)]
        for i, message_id in enumerate(ids):
            await add_turn(store, message_id, f"q{i}", f"a{i}", created_at=1_700_000_000.0)
        assert await store.recent_turns("default", "c1", 60) == [
            Turn(f"q{i}", f"a{i}") for i in range(60)
        ]
        assert await store.recent_turns("default", "c1", 5) == [
            Turn(f"q{i}", f"a{i}") for i in range(55, 60)
        ]

    async def test_recent_turns_of_one_conversation(self, store: HistoryStore) -> None:
        await add_turn(store, "a1", "qa1", "ra1", conversation_id="a")
        await add_turn(store, "b1", "qb1", "rb1", conversation_id="b")
        await add_turn(store, "a2", "qa2", "ra2", conversation_id="a")
        assert await store.recent_turns("default", "a", 10) == [
            Turn("qa1", "ra1"),
            Turn("qa2", "ra2"),
        ]
        assert await store.recent_turns("default", "b", 10) == [Turn("qb1", "rb1")]
        assert await store.recent_turns("default", "nope", 10) == []

    async def test_tenant_scoping(self, store: HistoryStore) -> None:
        await add_turn(store, "m1", "secret q", "secret a", tenant="acme")
        assert await store.get_message("other", "m1") is None
        assert await store.recent_turns("other", "c1", 10) == []
        assert await store.set_feedback("other", "m1", 0, "sabotage") is None
        got = await store.get_message("acme", "m1")
        assert got is not None
        assert (got.feedback_score, got.feedback_reason) == (-1, "")
        assert await store.recent_turns("acme", "c1", 10) == [Turn("secret q", "secret a")]

    async def test_set_feedback(self, store: HistoryStore) -> None:
        await add_turn(store, "m1", "q", "a")
        updated = await store.set_feedback("default", "m1", 87, "good, but long")
        assert updated is not None
        assert updated.message_id == "m1"
        assert updated.feedback_score == 87
        assert updated.feedback_reason == "good, but long"
        assert updated.response == "a"
        assert updated.status is Status.COMPLETED
        assert await store.get_message("default", "m1") == updated
        again = await store.set_feedback("default", "m1", 10, "")
        assert again is not None
        assert (again.feedback_score, again.feedback_reason) == (10, "")

    async def test_set_feedback_unknown_id(self, store: HistoryStore) -> None:
        assert await store.set_feedback("default", "nope", 50, "x") is None

    async def test_unicode_round_trip(self, store: HistoryStore) -> None:
        query = "你好\uff0c世界 😀🎉 — naïve café \U0001d518\U0001d52b\U0001d526 \u0000 nul"
        response = "こんにちは 👋🏽 العربية עברית\n\ttabs {{ 7*7 }} '; DROP TABLE messages; --"
        await store.add_message(
            record("m-é-😀", query, conversation_id="会话-1", meta={"标签": "😀"}, tenant="租户")
        )
        await store.finish_message("m-é-😀", done(response))
        got = await store.get_message("租户", "m-é-😀")
        assert got is not None
        assert got.query == query
        assert got.response == response
        assert got.conversation_id == "会话-1"
        assert got.meta == {"标签": "😀"}
        assert await store.recent_turns("租户", "会话-1", 1) == [Turn(query, response)]
        feedback = await store.set_feedback("租户", "m-é-😀", 100, "很好 👍")
        assert feedback is not None
        assert feedback.feedback_reason == "很好 👍"

    async def test_a_one_megabyte_response(self, store: HistoryStore) -> None:
        response = ("0123456789abcdef" * 65_536)[:1_048_575] + "😀"
        assert len(response.encode()) > 1_000_000
        await store.add_message(record("big"))
        await store.finish_message("big", done(response))
        got = await store.get_message("default", "big")
        assert got is not None
        assert got.response == response
        assert await store.recent_turns("default", "c1", 1) == [Turn("q", response)]

    async def test_the_largest_answer_and_its_deliveries(self, store: HistoryStore) -> None:
        # The worst case: every character 4 bytes of UTF-8, the answer at its ceiling, the
        # query at its default limit, and deliveries whose payload carries both (as a
        # webhook's does): 8 MiB of answer in the record and as much in each delivery.
        response = "😀" * MAX_ANSWER_CHARS
        query = "😀" * 32_000
        payload = orjson.dumps({"data": {"query": query, "text": response}}).decode()
        await store.add_message(record("big", query))
        deliveries = [delivery("d1", payload=payload), delivery("d2", payload=payload)]
        await store.finish_message("big", done(response), deliveries)
        got = await store.get_message("default", "big")
        assert got is not None and (got.query, got.response) == (query, response)
        assert [d.payload == payload for d in await store.outbox.deliveries(None, 10)] == [
            True,
            True,
        ]

    async def test_duplicate_message_id_is_refused(self, store: HistoryStore) -> None:
        await store.add_message(record("m1", "first"))
        with pytest.raises(Exception):  # noqa: B017 (each store raises its own duplicate-key error)
            await store.add_message(record("m1", "second"))
        got = await store.get_message("default", "m1")
        assert got is not None
        assert got.query == "first"

    async def test_statuses_round_trip(self, store: HistoryStore) -> None:
        for status in Status:
            await store.add_message(record(f"m-{status}", conversation_id="s"))
            if status is not Status.STREAMING:
                await store.finish_message(f"m-{status}", done("x", status))
        for status in Status:
            got = await store.get_message("default", f"m-{status}")
            assert got is not None and got.status is status

    async def test_the_answering_model_is_recorded(self, store: HistoryStore) -> None:
        await store.add_message(record("m1"))
        await store.finish_message("m1", done("x", model="fallback"))
        got = await store.get_message("default", "m1")
        assert got is not None and got.model == "fallback"
        await store.add_message(record("m2"))
        await store.finish_message("m2", done("x"))  # no model: the one asked for stays
        got = await store.get_message("default", "m2")
        assert got is not None and got.model == "echo"

    async def test_conversations_newest_first_and_paged(self, store: HistoryStore) -> None:
        for conversation in ("a", "b", "c"):
            await add_turn(store, f"{conversation}1", f"first of {conversation}", "r",
                           conversation_id=conversation)  # fmt: skip
        await add_turn(store, "a2", "second of a", "r", conversation_id="a")  # a is newest now
        await add_turn(store, "x1", "q", "r", conversation_id="x", tenant="other")
        await add_turn(store, "none", "q", "r", conversation_id="")  # no conversation: not listed
        listed = await store.conversations("default", 10, 0)
        assert [c.conversation_id for c in listed] == ["a", "c", "b"]
        assert (listed[0].turns, listed[0].first_query) == (2, "first of a")
        assert listed[0].created_at <= listed[0].updated_at
        assert [c.conversation_id for c in await store.conversations("default", 2, 1)] == ["c", "b"]
        assert await store.conversations("default", 10, 3) == []
        assert [c.conversation_id for c in await store.conversations("other", 10, 0)] == ["x"]

    async def test_conversations_paged_by_key(self, store: HistoryStore) -> None:
        for conversation in "abcde":
            await add_turn(store, conversation, "q", "r", conversation_id=conversation)
        first = await store.conversations("default", 2, 0)
        assert [c.conversation_id for c in first] == ["e", "d"]
        await add_turn(store, "b2", "q", "r", conversation_id="b")  # b moves to the front
        second = await store.conversations("default", 2, 0, after=first[-1].key)
        assert [c.conversation_id for c in second] == ["c", "a"]  # none twice, b not again
        assert await store.conversations("default", 2, 0, after=second[-1].key) == []
        assert [c.conversation_id for c in await store.conversations("default", 1, 1,
                after=first[0].key)] == ["c"]  # fmt: skip
        assert await store.conversations("other", 10, 0, after=first[0].key) == []

    async def test_conversation_summaries_match_a_recount(self, store: HistoryStore) -> None:
        """Whatever happens to their turns (ended any way, feedback, checkpoints, deleted
        conversations, a duplicate refused), the listing says what counting them says."""
        ends = [Status.COMPLETED, Status.FAILED, Status.CANCELLED, Status.INTERRUPTED, None]
        latest: dict[tuple[str, str], int] = {}  # (tenant, conversation) -> its last turn's i
        for i in range(60):
            conversation, tenant = f"c{i % 7}", ("default", "other")[i % 11 == 0]
            latest[tenant, conversation] = i
            added = record(f"m{i}", f"q{i}", conversation_id=conversation, tenant=tenant,
                           created_at=1_700_000_000.0 + (i * 37) % 50)  # fmt: skip
            await store.add_message(added)
            end = ends[i % len(ends)]
            if end is None:
                await store.save_partial(f"m{i}", "so far")  # still streaming
            else:
                await store.finish_message(f"m{i}", done("r", end))
            if i % 4 == 0:
                await store.set_feedback(tenant, f"m{i}", 50, "ok")
        with pytest.raises(Exception):  # noqa: B017 (each store raises its own duplicate-key error)
            await store.add_message(record("m3", "again", conversation_id="c3"))
        assert await store.delete_conversation("default", "c2") > 0
        assert await store.delete_conversation("default", "c5") > 0
        del latest["default", "c5"]
        await add_turn(store, "late", "q late", "r", conversation_id="c2")  # c2 starts anew
        latest["default", "c2"] = 60
        for tenant in ("default", "other"):
            listed = await store.conversations(tenant, 100, 0)
            assert listed and [_summary(c) for c in listed] == await _recount(store, tenant, listed)
            newest_first = sorted((i, c) for (t, c), i in latest.items() if t == tenant)[::-1]
            assert [c.conversation_id for c in listed] == [c for _, c in newest_first]

    async def test_messages_oldest_first_and_paged(self, store: HistoryStore) -> None:
        for i in range(5):
            await add_turn(store, f"m{i}", f"q{i}", f"r{i}", conversation_id="c")
        await add_turn(store, "other", "q", "r", conversation_id="c", tenant="other")
        got = await store.messages("default", "c", 10, 0)
        assert [m.message_id for m in got] == [f"m{i}" for i in range(5)]
        assert got[0].response == "r0" and got[0].status is Status.COMPLETED
        assert [m.message_id for m in await store.messages("default", "c", 2, 3)] == ["m3", "m4"]
        assert [m.message_id for m in await store.messages("other", "c", 10, 0)] == ["other"]

    async def test_delete_a_conversation(self, store: HistoryStore) -> None:
        for i in range(3):
            await add_turn(store, f"m{i}", "q", "r", conversation_id="gone")
        await add_turn(store, "kept", "q", "r", conversation_id="kept")
        await add_turn(store, "theirs", "q", "r", conversation_id="gone", tenant="other")
        assert await store.delete_conversation("default", "gone") == 3
        assert await store.messages("default", "gone", 10, 0) == []
        assert await store.get_message("default", "m0") is None
        assert await store.get_message("default", "kept") is not None
        assert await store.get_message("other", "theirs") is not None  # another tenant's stays
        assert await store.delete_conversation("default", "gone") == 0

    # Instances' leases

    async def test_orphaned_turns_are_those_of_instances_without_a_lease(
        self, store: HistoryStore
    ) -> None:
        await store.keep_lease("me", now=100.0, lease_until=1000.0)
        await store.keep_lease("alive", now=100.0, lease_until=200.0)
        await store.keep_lease("dying", now=100.0, lease_until=150.0)
        await store.add_message(record("alive1", instance_id="alive"))
        await store.add_message(record("dying1", instance_id="dying"))
        await store.add_message(record("dying2", instance_id="dying"))
        await store.add_message(record("unleased", instance_id="never-leased"))
        await add_turn(store, "ended", "q", "r", instance_id="dying")
        claimed = await store.claim_orphaned_turns("me", now=120.0, limit=10)
        assert [turn.message_id for turn in claimed] == ["unleased"]
        assert claimed[0].instance_id == "me" and claimed[0].status is Status.STREAMING
        (first,) = await store.claim_orphaned_turns("me", now=160.0, limit=1)  # dying is dead
        (second,) = await store.claim_orphaned_turns("me", now=160.0, limit=10)
        assert {first.message_id, second.message_id} == {"dying1", "dying2"}
        assert await store.claim_orphaned_turns("me", now=160.0, limit=10) == []  # all mine now
        got = await store.get_message("default", "dying1")
        assert got is not None and got.instance_id == "me"
        # My lease expired too: another instance takes every turn still streaming.
        await store.keep_lease("next", now=1100.0, lease_until=1200.0)
        taken = await store.claim_orphaned_turns("next", now=1100.0, limit=10)
        assert sorted(t.message_id for t in taken) == ["alive1", "dying1", "dying2", "unleased"]

    async def test_a_renewed_lease_keeps_the_turns(self, store: HistoryStore) -> None:
        await store.keep_lease("a", now=100.0, lease_until=150.0)
        await store.add_message(record("m1", instance_id="a"))
        await store.keep_lease("a", now=140.0, lease_until=190.0)
        await store.keep_lease("b", now=170.0, lease_until=300.0)  # forgets what expired by 170
        assert await store.claim_orphaned_turns("b", now=170.0, limit=10) == []
        (taken,) = await store.claim_orphaned_turns("b", now=191.0, limit=10)
        assert taken.message_id == "m1"

    async def test_concurrent_claimers_never_share_a_turn(self, store: HistoryStore) -> None:
        for i in range(20):
            await store.add_message(record(f"m{i:02d}", instance_id="dead"))
        for n in range(6):
            await store.keep_lease(f"o{n}", now=100.0, lease_until=200.0)
        batches = await asyncio.gather(
            *(store.claim_orphaned_turns(f"o{n}", now=100.0, limit=5) for n in range(6))
        )
        claimed = [turn.message_id for batch in batches for turn in batch]
        assert sorted(claimed) == [f"m{i:02d}" for i in range(20)]  # each exactly once

    async def test_a_checkpoint_keeps_the_answer_so_far_of_a_streaming_turn(
        self,
        store: HistoryStore,
    ) -> None:
        await store.add_message(record("m1"))
        await store.save_partial("m1", "the answer so")
        found = await store.get_message("default", "m1")
        assert found is not None and (found.response, found.status) == (
            "the answer so",
            "streaming",
        )
        (listed,) = await store.claim_orphaned_turns("next", now=2e9, limit=10)
        assert listed.response == "the answer so"
        await store.finish_message("m1", Outcome("the answer so far", Status.COMPLETED, None, 1.0))
        await store.save_partial("m1", "a late checkpoint")  # an ended turn is left as it is
        found = await store.get_message("default", "m1")
        assert found is not None and found.response == "the answer so far"

    async def test_concurrent_turns_in_one_conversation(self, store: HistoryStore) -> None:
        ids = [f"m{i:02d}" for i in range(30)]
        await asyncio.gather(
            *(store.add_message(record(i, i, conversation_id="busy")) for i in ids)
        )
        await asyncio.gather(*(store.finish_message(i, done(f"answer {i}")) for i in ids))
        turns = await store.recent_turns("default", "busy", 30)
        assert [t.query for t in turns] == ids  # the order they were started in
        assert all(t.response == f"answer {t.query}" for t in turns)

    async def test_ping(self, store: HistoryStore) -> None:
        await store.ping()

    # The outbox

    async def test_a_turn_and_its_deliveries_are_written_together(
        self, store: HistoryStore
    ) -> None:
        await store.add_message(record("m1"))
        await store.finish_message("m1", done("answer"), [delivery("d1"), delivery("d2")])
        listed = await store.outbox.deliveries(None, 10)
        assert sorted(d.delivery_id for d in listed) == ["d1", "d2"]
        assert listed[0].status is DeliveryStatus.PENDING
        assert listed[0].payload == '{"type": "chat.completed"}'
        got = await store.get_message("default", "m1")
        assert got is not None and got.response == "answer"

    async def test_the_first_end_of_a_turn_stands(self, store: HistoryStore) -> None:
        """A turn ends once. An instance that found another's lease expired ends its turns
        `interrupted`; if that other was only slow, its own end comes later and is dropped,
        deliveries and all (with or without deliveries, the first end's)."""
        await store.add_message(record("m1"))
        interrupted = done("so far", Status.INTERRUPTED, error="interrupted")
        await store.finish_message("m1", interrupted, [delivery("failed")])
        await store.finish_message("m1", done("the whole answer"), [delivery("completed")])
        await store.finish_message("m1", done("again, without deliveries"))
        got = await store.get_message("default", "m1")
        assert got is not None
        assert (got.status, got.response, got.error) == (
            Status.INTERRUPTED,
            "so far",
            "interrupted",
        )
        listed = await store.outbox.deliveries(None, 10)
        assert [d.delivery_id for d in listed] == ["failed"]

    async def test_claims_take_due_deliveries_once_while_the_lease_runs(
        self, store: HistoryStore
    ) -> None:
        await store.outbox.add_deliveries(
            [delivery("due1", next_attempt_at=10.0), delivery("due2", next_attempt_at=20.0),
             delivery("later", next_attempt_at=500.0)]
        )  # fmt: skip
        first = await store.outbox.claim_deliveries("a", now=100.0, lease_until=160.0, limit=10)
        assert [d.delivery_id for d in first] == ["due1", "due2"]  # the most overdue first
        assert {d.lease_owner for d in first} == {"a"}
        assert (
            await store.outbox.claim_deliveries("b", now=120.0, lease_until=180.0, limit=10) == []
        )
        # The lease expired (its holder died, say): another instance may take it.
        again = await store.outbox.claim_deliveries("b", now=170.0, lease_until=230.0, limit=1)
        assert [d.delivery_id for d in again] == ["due1"]

    async def test_concurrent_claimers_never_share_a_delivery(self, store: HistoryStore) -> None:
        await store.outbox.add_deliveries(
            [delivery(f"d{i:02d}", next_attempt_at=float(i)) for i in range(20)]
        )
        batches = await asyncio.gather(
            *(
                store.outbox.claim_deliveries(f"o{n}", now=100.0, lease_until=200.0, limit=5)
                for n in range(6)
            )
        )
        claimed = [d.delivery_id for batch in batches for d in batch]
        assert sorted(claimed) == [f"d{i:02d}" for i in range(20)]  # each exactly once

    async def test_settling_needs_the_lease(self, store: HistoryStore) -> None:
        await store.outbox.add_deliveries([delivery("d1", next_attempt_at=0.0)])
        (claimed,) = await store.outbox.claim_deliveries("a", now=1.0, lease_until=61.0, limit=1)
        stale = delivery("d1", lease_owner="b", status=DeliveryStatus.DELIVERED, attempts=1)
        assert await store.outbox.settle_delivery(stale) is False  # b never held it
        claimed.status, claimed.attempts, claimed.last_error = DeliveryStatus.DEAD, 6, "HTTP 500"
        assert await store.outbox.settle_delivery(claimed) is True
        (settled,) = await store.outbox.deliveries(DeliveryStatus.DEAD, 10)
        assert (settled.attempts, settled.last_error, settled.lease_owner) == (6, "HTTP 500", None)
        assert await store.outbox.deliveries(DeliveryStatus.PENDING, 10) == []
        assert (
            await store.outbox.claim_deliveries("a", now=999.0, lease_until=1059.0, limit=1) == []
        )

    async def test_redeliver(self, store: HistoryStore) -> None:
        await store.outbox.add_deliveries([delivery("d1", status=DeliveryStatus.DEAD, attempts=6)])
        assert await store.outbox.redeliver("d1", now=50.0) is True
        (again,) = await store.outbox.claim_deliveries("a", now=50.0, lease_until=110.0, limit=1)
        assert (again.delivery_id, again.attempts, again.status) == (
            "d1",
            0,
            DeliveryStatus.PENDING,
        )
        assert await store.outbox.redeliver("nope", now=50.0) is False
