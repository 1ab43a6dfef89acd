"""Conversations' summaries in MongoDB: a document a conversation (its turns, first query,
first and last activity), upserted with each turn it gains. A listing reads a page of them
by an index, so its cost grows with the page, not with the history (an aggregation over the
turns would group every turn of the tenant to sort by last activity). A database from
before them gets them built from the turns at start-up, once (`BUILT` marks it done).
Upgrade every instance together: one running older code lists from the turns and counts
no summary."""

from __future__ import annotations

import inspect
import time
from typing import Any

import structlog
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import BulkWriteError, DuplicateKeyError

from core.history import Conversation, ListingKey

log = structlog.get_logger("chatbus.history_mongo")
DUPLICATE_KEY = 11000  # MongoDB's error code
BUILD_BATCH = 1000  # summaries written at a time when building them from the turns
BUILT = "built from the turns"  # the `_id` of the mark that the summaries were built


class ConversationSummaries:
    """`<collection>_conversations`, beside the turns of `messages`."""

    def __init__(self, summaries: Any, messages: Any) -> None:
        self._summaries = summaries
        self._messages = messages

    async def count_turn(self, turn: dict[str, Any]) -> None:
        """The turn counted in its conversation's summary (created with its first turn).
        Not in the turn's transaction: every turn of a conversation writes this one
        document, and concurrent transactions on it abort each other, while the server
        serialises lone updates itself. Written after the turn: a crash between leaves the
        summary a turn short, never counting a turn that is not stored."""
        summary = {"tenant": turn["tenant"], "conversation_id": turn["conversation_id"]}
        change = {
            "$inc": {"turns": 1},
            "$setOnInsert": {"first_query": turn["query"]},
            "$min": {"created_at": turn["created_at"]},
            "$max": {"updated_at": turn["created_at"], "last_seq": turn["seq"]},
        }
        try:
            await self._summaries.update_one(summary, change, upsert=True)
        except DuplicateKeyError:  # two first turns at once: the other one created it
            await self._summaries.update_one(summary, change)

    async def page(
        self, tenant: str, limit: int, offset: int, after: ListingKey | None
    ) -> list[Conversation]:
        """The tenant's conversations, the most recently active first; past `after`."""
        if limit <= 0:
            return []
        query: dict[str, Any] = {"tenant": tenant}
        if after is not None:
            query["$or"] = [
                {"last_seq": {"$lt": after.last_seq}},
                {"last_seq": after.last_seq, "conversation_id": {"$lt": after.conversation_id}},
            ]
        cursor = self._summaries.find(query, {"_id": 0})
        cursor = cursor.sort([("last_seq", DESCENDING), ("conversation_id", DESCENDING)])
        rows = await cursor.skip(max(offset, 0)).limit(limit).to_list(None)
        return [
            Conversation(row["conversation_id"], row["turns"], row["first_query"],
                         row["created_at"], row["updated_at"], row["last_seq"])
            for row in rows
        ]  # fmt: skip

    async def forget(self, scope: dict[str, str]) -> None:
        """A deleted conversation's summary (after its turns: a crash between leaves it to
        the next delete)."""
        await self._summaries.delete_one(scope)

    async def prepare(self) -> None:
        """The summaries' indexes; built from the turns unless that was done (a database
        from before them: once, and again after a crash during the build)."""
        await self._summaries.create_index(
            [("tenant", ASCENDING), ("conversation_id", ASCENDING)],
            name="by_conversation", unique=True,
        )  # fmt: skip
        await self._summaries.create_index(
            [("tenant", ASCENDING), ("last_seq", DESCENDING), ("conversation_id", DESCENDING)],
            name="by_activity",
        )
        if await self._summaries.find_one({"_id": BUILT}) is None:
            await self._build()

    async def _build(self) -> None:
        """Each conversation's summary, counted from its turns; one that exists is kept (an
        instance counting live turns, or a build that a crash cut short, wrote it)."""
        pipeline = [
            {"$match": {"conversation_id": {"$ne": ""}}},
            {"$sort": {"seq": ASCENDING}},
            {
                "$group": {
                    "_id": {"tenant": "$tenant", "conversation_id": "$conversation_id"},
                    "turns": {"$sum": 1},
                    "first_query": {"$first": "$query"},
                    "created_at": {"$min": "$created_at"},
                    "updated_at": {"$max": "$created_at"},
                    "last_seq": {"$max": "$seq"},
                }
            },
        ]
        cursor = self._messages.aggregate(pipeline, allowDiskUse=True)
        if inspect.isawaitable(cursor):  # PyMongo's async API awaits it
            cursor = await cursor
        built, batch = 0, []
        async for row in cursor:
            batch.append({**row.pop("_id"), **row})
            if len(batch) == BUILD_BATCH:
                built += await self._insert_new(batch)
                batch = []
        built += await self._insert_new(batch)
        # Marked built: no tenant, so never listed (and alone without one in the index).
        await self._summaries.update_one({"_id": BUILT}, {"$set": {"at": time.time()}},
                                             upsert=True)  # fmt: skip
        if built:
            log.info("MongoDB conversations built from the turns", conversations=built)

    async def _insert_new(self, summaries: list[dict[str, Any]]) -> int:
        if not summaries:
            return 0
        try:
            await self._summaries.insert_many(summaries, ordered=False)
        except BulkWriteError as exc:  # some exist already: kept
            if any(error["code"] != DUPLICATE_KEY for error in exc.details["writeErrors"]):
                raise
        return len(summaries)
