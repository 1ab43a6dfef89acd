"""MongoDB history store. One document per turn, `_id` = message id. Turns are ordered by
`seq`, nanoseconds kept strictly increasing by each instance, so turns in the same
millisecond keep their order (BSON dates alone have millisecond resolution).

A turn's end and its deliveries are one atomic step: a transaction where the deployment has
them (a replica set or a sharded cluster, found at start-up), else the three writes of a
held end (outbox.py). Instances' leases are documents of `<collection>_instances`, and
conversations' summaries of `<collection>_conversations` (summaries.py)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import structlog
from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import ExecutionTimeout

from core.history import (
    READABLE,
    Conversation,
    ListingKey,
    MessageRecord,
    Outcome,
    Status,
    StoreUnavailable,
    Turn,
)
from core.outbox import Delivery
from core.providers import Usage
from plugins.history_mongo.errors import reachable
from plugins.history_mongo.outbox import MongoOutbox
from plugins.history_mongo.summaries import ConversationSummaries

log = structlog.get_logger("chatbus.history_mongo")
LOCKED_WAIT_MS = 500  # how long a claim waits for a turn that another write holds
FIELDS = (
    "conversation_id", "tenant", "chat_type", "query", "response", "status", "model",
    "latency", "error", "feedback_score", "feedback_reason", "meta", "created_at",
    "instance_id",
)  # fmt: skip


class MongoStore:
    def __init__(
        self,
        client: Any,
        database: str,
        collection: str = "messages",
        transactions: bool | None = None,
    ) -> None:
        """`transactions`: None finds out at start-up whether the deployment has them;
        False writes a turn's end without one even where it has (held, then released)."""
        self._client = client  # pymongo.AsyncMongoClient, or a stand-in with its shape
        self._messages = client[database][collection]
        self._instances = client[database][f"{collection}_instances"]
        self._summaries = ConversationSummaries(
            client[database][f"{collection}_conversations"], self._messages
        )
        self.outbox = MongoOutbox(client[database][f"{collection}_outbox"], self._messages)
        self._transactions = transactions
        self._prepared = False
        self._last_seq = 0

    async def open(self) -> None:
        try:
            await self._prepare()
        except StoreUnavailable as exc:
            log.warning("MongoDB unreachable at start-up; will retry on use", error=str(exc))

    @property
    def transactions(self) -> bool | None:
        """Whether a turn's end is written in a transaction (None: not known yet)."""
        return self._transactions

    async def close(self) -> None:
        closed = self._client.close()
        if inspect.isawaitable(closed):
            await closed

    async def ping(self) -> None:
        with reachable():
            await self._client.admin.command("ping")
        await self._prepare()

    async def add_message(self, record: MessageRecord) -> None:
        document = {field: getattr(record, field) for field in FIELDS}
        document.update(
            _id=record.message_id,
            seq=self._next_seq(),
            status=str(record.status),
            usage=_usage(record.usage),
        )
        await self._prepare()
        with reachable():
            await self._messages.insert_one(document)
            if record.conversation_id:  # "" groups nothing: never listed
                await self._summaries.count_turn(document)

    async def finish_message(
        self, message_id: str, outcome: Outcome, deliveries: Sequence[Delivery] = ()
    ) -> None:
        changes: dict[str, Any] = {
            "response": outcome.response,
            "status": str(outcome.status),
            "usage": _usage(outcome.usage),
            "latency": outcome.latency,
            "error": outcome.error,
        }
        if outcome.model is not None:
            changes["model"] = outcome.model
        changes.update({f"meta.{key}": value for key, value in outcome.answer_meta().items()})
        await self._prepare()
        # A turn ends once: over one another instance ended first (it found this one's
        # lease expired), this end is dropped, and its deliveries with it.
        if not deliveries:
            with reachable():
                await self._messages.update_one(
                    {"_id": message_id, "status": str(Status.STREAMING)}, {"$set": changes}
                )
        elif self._transactions:
            await self._finish_in_a_transaction(message_id, changes, deliveries)
        else:
            await self._finish_held(message_id, changes, deliveries)

    async def _finish_in_a_transaction(
        self, message_id: str, changes: dict[str, Any], deliveries: Sequence[Delivery]
    ) -> None:
        # Not `with_transaction`: it retries for up to two minutes, while the turn's end
        # waits; a failed end is retried by the chat service, and a retry of one that did
        # commit finds the turn ended and writes nothing.
        with reachable():
            async with (
                self._client.start_session() as session,
                await session.start_transaction(),
            ):
                ended = await self._messages.update_one(
                    {"_id": message_id, "status": str(Status.STREAMING)},
                    {"$set": changes},
                    session=session,
                )
                if ended.matched_count:
                    await self.outbox.add_deliveries(deliveries, session=session)

    async def _finish_held(
        self, message_id: str, changes: dict[str, Any], deliveries: Sequence[Delivery]
    ) -> None:
        """Without a transaction (outbox.py tells how a crash between the writes is mended):
        the deliveries held, the end naming them, then released. The end is written only
        over a turn still streaming (or over itself, when retried): if another end came
        first (an instance that found this one's lease expired), this one is dropped."""
        end_id = deliveries[0].delivery_id  # the same on every retry of this end
        await self.outbox.add_deliveries(deliveries, held_by=end_id)
        with reachable():
            result = await self._messages.update_one(
                {"_id": message_id, "$or": [{"status": str(Status.STREAMING)}, {"end_id": end_id}]},
                {"$set": {**changes, "end_id": end_id}},
            )
        if result.matched_count:
            await self.outbox.release(end_id)
        else:
            await self.outbox.drop(end_id)

    async def recent_turns(self, tenant: str, conversation_id: str, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        query = {
            "tenant": tenant,
            "conversation_id": conversation_id,
            # A turn that answered with tool calls alone has no text, and is history too.
            "$or": [{"response": {"$ne": ""}}, {"meta.tool_calls.0": {"$exists": True}}],
            "status": {"$in": [str(status) for status in READABLE]},
        }
        projection = {"query": 1, "response": 1, "meta.tool_calls": 1, "meta.tool_results": 1}
        with reachable():
            cursor = self._messages.find(query, projection)
            rows = await cursor.sort("seq", DESCENDING).limit(limit).to_list(None)
        return [
            Turn.of(row["query"], row["response"], row.get("meta") or {}) for row in reversed(rows)
        ]

    async def get_message(self, tenant: str, message_id: str) -> MessageRecord | None:
        with reachable():
            document = await self._messages.find_one({"_id": message_id, "tenant": tenant})
        return _record(document) if document is not None else None

    async def set_feedback(
        self, tenant: str, message_id: str, score: int, reason: str
    ) -> MessageRecord | None:
        with reachable():
            document = await self._messages.find_one_and_update(
                {"_id": message_id, "tenant": tenant},
                {"$set": {"feedback_score": score, "feedback_reason": reason}},
                return_document=ReturnDocument.AFTER,
            )
        return _record(document) if document is not None else None

    async def conversations(
        self, tenant: str, limit: int, offset: int, after: ListingKey | None = None
    ) -> list[Conversation]:
        with reachable():
            return await self._summaries.page(tenant, limit, offset, after)

    async def messages(
        self, tenant: str, conversation_id: str, limit: int, offset: int
    ) -> list[MessageRecord]:
        if limit <= 0:
            return []
        with reachable():
            cursor = self._messages.find({"tenant": tenant, "conversation_id": conversation_id})
            rows = (
                await cursor.sort("seq", ASCENDING).skip(max(offset, 0)).limit(limit).to_list(None)
            )
        return [_record(row) for row in rows]

    async def delete_conversation(self, tenant: str, conversation_id: str) -> int:
        # The summary after the turns: a crash between leaves it to the next delete.
        scope = {"tenant": tenant, "conversation_id": conversation_id}
        with reachable():
            result = await self._messages.delete_many(scope)
            await self._summaries.forget(scope)
        return int(result.deleted_count)

    async def save_partial(self, message_id: str, response: str) -> None:
        with reachable():
            await self._messages.update_one(
                {"_id": message_id, "status": str(Status.STREAMING)},
                {"$set": {"response": response}},
            )

    async def keep_lease(self, instance_id: str, now: float, lease_until: float) -> None:
        with reachable():
            await self._instances.update_one(
                {"_id": instance_id}, {"$set": {"lease_until": lease_until}}, upsert=True
            )
            await self._instances.delete_many({"lease_until": {"$lt": now}})

    async def claim_orphaned_turns(
        self, instance_id: str, now: float, limit: int
    ) -> list[MessageRecord]:
        # The instances are read after the turns: an instance's lease is written before its
        # first turn, so a turn seen here has its instance's lease seen too (if it lives).
        streaming = {"status": str(Status.STREAMING)}
        claimed: list[MessageRecord] = []
        with reachable():
            holders = await self._messages.distinct("instance_id", streaming)
            live = await self._instances.distinct(
                "_id", {"_id": {"$in": holders}, "lease_until": {"$gte": now}}
            )
            dead = [holder for holder in holders if holder not in live]
            orphaned = {
                **streaming,
                "$or": [{"instance_id": {"$in": dead}}, {"instance_id": {"$exists": False}}],
            }
            # The orphans' ids in one read, then each handed over if still orphaned (a
            # locked one is passed over); what another claimer took meanwhile is read
            # past, until `limit` or no orphan is left but locked ones.
            passed: list[str] = []
            while len(claimed) < limit:
                unseen = {**orphaned, "_id": {"$nin": passed}}
                cursor = self._messages.find(unseen, {"_id": 1}).sort("seq", ASCENDING)
                candidates = await cursor.limit(limit - len(claimed)).to_list(None)
                if not candidates:
                    break
                for candidate in candidates:
                    turn = {**orphaned, "_id": candidate["_id"]}
                    document = await self._hand_over(turn, instance_id)
                    if document is not None:
                        claimed.append(_record(document))
                    passed.append(candidate["_id"])
        return claimed

    async def _hand_over(self, turn: dict[str, Any], instance_id: str) -> dict[str, Any] | None:
        """The turn, now `instance_id`'s; None if another claimer took it first, or if a
        dead instance's unfinished transaction still locks it (until the server aborts
        that transaction: a minute on mongod; it is claimed at a later poll)."""
        try:
            document: dict[str, Any] | None = await self._messages.find_one_and_update(
                turn,
                {"$set": {"instance_id": instance_id}},
                return_document=ReturnDocument.AFTER,
                maxTimeMS=LOCKED_WAIT_MS,
            )
        except ExecutionTimeout:
            return None
        return document

    async def _prepare(self) -> None:
        """Indexes, and whether the deployment has transactions: found out once, at
        start-up or, if MongoDB was down then, on first use."""
        if self._prepared:
            return
        with reachable():
            await self._messages.create_index(
                [("tenant", ASCENDING), ("conversation_id", ASCENDING), ("seq", ASCENDING)],
                name="by_conversation",
            )
            await self._messages.create_index([("status", ASCENDING)], name="by_status")
            await self._summaries.prepare()
            await self.outbox.create_indexes()
            if self._transactions is None:
                self._transactions = await self._has_transactions()
        self._prepared = True  # message ids are `_id`: indexed, and unique, by MongoDB itself
        log.info("MongoDB store ready", transactions=self._transactions)

    async def _has_transactions(self) -> bool:
        """A replica set member (`setName`) or a mongos (`isdbgrid`) with sessions runs
        transactions; a standalone mongod does not."""
        hello = await self._client.admin.command("hello")
        cluster = "setName" in hello or hello.get("msg") == "isdbgrid"
        return cluster and "logicalSessionTimeoutMinutes" in hello

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns())
        return self._last_seq


def _usage(usage: Usage | None) -> dict[str, int | None] | None:
    if usage is None:
        return None
    return usage.counts()


def _record(document: dict[str, Any]) -> MessageRecord:
    values: dict[str, Any] = {field: document.get(field) for field in FIELDS}
    values["status"] = Status(values["status"])
    values["usage"] = Usage(**document["usage"]) if document.get("usage") else None
    values["meta"] = values["meta"] or {}
    values["instance_id"] = values["instance_id"] or ""  # a turn stored before leases
    return MessageRecord(message_id=document["_id"], **values)
