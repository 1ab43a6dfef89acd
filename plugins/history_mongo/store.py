"""MongoDB history store. One document per turn, `_id` = message id. Turns are ordered by
`seq`, nanoseconds kept strictly increasing by each instance, so turns in the same
millisecond keep their order (BSON dates alone have millisecond resolution)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any

import structlog
from pymongo import ASCENDING, DESCENDING, ReturnDocument

from core.history import (
    READABLE,
    Conversation,
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

log = structlog.get_logger("chatbus.history_mongo")
FIELDS = (
    "conversation_id", "tenant", "chat_type", "query", "response", "status", "model",
    "latency", "error", "feedback_score", "feedback_reason", "meta", "created_at",
)  # fmt: skip


class MongoStore:
    def __init__(self, client: Any, database: str, collection: str = "messages") -> None:
        self._client = client  # pymongo.AsyncMongoClient, or a stand-in with its shape
        self._messages = client[database][collection]
        self.outbox = MongoOutbox(client[database][f"{collection}_outbox"])
        self._indexed = False
        self._last_seq = 0

    async def open(self) -> None:
        try:
            await self._ensure_indexes()
        except StoreUnavailable as exc:
            log.warning("MongoDB unreachable at start-up; will retry on use", error=str(exc))

    async def close(self) -> None:
        closed = self._client.close()
        if inspect.isawaitable(closed):
            await closed

    async def ping(self) -> None:
        with reachable():
            await self._client.admin.command("ping")
        await self._ensure_indexes()

    async def add_message(self, record: MessageRecord) -> None:
        document = {field: getattr(record, field) for field in FIELDS}
        document.update(
            _id=record.message_id,
            seq=self._next_seq(),
            status=str(record.status),
            usage=_usage(record.usage),
        )
        await self._ensure_indexes()
        with reachable():
            await self._messages.insert_one(document)

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
        with reachable():
            await self._messages.update_one({"_id": message_id}, {"$set": changes})
        # Not one transaction (that needs a replica set), but the very next write.
        await self.outbox.add_deliveries(deliveries)

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

    async def conversations(self, tenant: str, limit: int, offset: int) -> list[Conversation]:
        pipeline = [
            {"$match": {"tenant": tenant, "conversation_id": {"$ne": ""}}},
            {"$sort": {"seq": ASCENDING}},
            {
                "$group": {
                    "_id": "$conversation_id",
                    "turns": {"$sum": 1},
                    "first_query": {"$first": "$query"},
                    "created_at": {"$min": "$created_at"},
                    "updated_at": {"$max": "$created_at"},
                    "last_seq": {"$max": "$seq"},
                }
            },
            {"$sort": {"last_seq": DESCENDING}},
            {"$skip": max(offset, 0)},
            {"$limit": max(limit, 1)},
        ]
        with reachable():
            cursor = self._messages.aggregate(pipeline)
            if inspect.isawaitable(cursor):  # PyMongo's async API awaits it; motor's shape not
                cursor = await cursor
            rows = await cursor.to_list(None) if limit > 0 else []
        return [
            Conversation(row["_id"], row["turns"], row["first_query"], row["created_at"],
                         row["updated_at"])
            for row in rows
        ]  # fmt: skip

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
        with reachable():
            result = await self._messages.delete_many(
                {"tenant": tenant, "conversation_id": conversation_id}
            )
        return int(result.deleted_count)

    async def save_partial(self, message_id: str, response: str) -> None:
        with reachable():
            await self._messages.update_one(
                {"_id": message_id, "status": str(Status.STREAMING)},
                {"$set": {"response": response}},
            )

    async def streaming_turns(self, started_before: float, limit: int) -> list[MessageRecord]:
        query = {"status": str(Status.STREAMING), "created_at": {"$lt": started_before}}
        with reachable():
            cursor = self._messages.find(query).sort("seq", ASCENDING).limit(limit)
            documents = await cursor.to_list(None)
        return [_record(document) for document in documents]

    async def _ensure_indexes(self) -> None:
        """Created once, at start-up or, if MongoDB was down then, on first use."""
        if self._indexed:
            return
        with reachable():
            await self._messages.create_index(
                [("tenant", ASCENDING), ("conversation_id", ASCENDING), ("seq", ASCENDING)],
                name="by_conversation",
            )
            await self._messages.create_index([("status", ASCENDING)], name="by_status")
            await self.outbox.create_indexes()
        self._indexed = True  # message ids are `_id`: indexed, and unique, by MongoDB itself

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
    return MessageRecord(message_id=document["_id"], **values)
