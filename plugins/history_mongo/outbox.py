"""The outbox in MongoDB: a collection next to the messages; each delivery is claimed by
an atomic find-and-modify, so no two instances hold one at once.

Where MongoDB has no transactions (a standalone server), a turn's end and its deliveries
are three writes (store.py): the deliveries are written *held* (`held_by`: the end they
belong to, not claimable), then the turn's end names that end (`end_id`), then they are
released. A crash between two of them leaves deliveries held: the next claim looks at
those held for more than HELD_GRACE seconds and releases the ones whose turn names their
end, and drops the ones whose turn ended otherwise (that end was never written)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne

from core.outbox import Delivery, DeliveryStatus
from plugins.history_mongo.errors import reachable

STREAMING = "streaming"  # core.history.Status.STREAMING, as stored
HELD_GRACE = 2.0  # seconds a held delivery's own end gets to release it, before a claim looks
HELD_BATCH = 100  # held deliveries looked at in one claim


class MongoOutbox:
    """The store's `outbox`: a collection beside its messages."""

    def __init__(self, collection: Any, messages: Any) -> None:
        self._outbox = collection
        self._messages = messages  # the turns held deliveries belong to

    async def create_indexes(self) -> None:
        await self._outbox.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="due"
        )
        await self._outbox.create_index([("held_by", ASCENDING)], name="held", sparse=True)

    async def add_deliveries(
        self, deliveries: Sequence[Delivery], session: Any = None, held_by: str | None = None
    ) -> None:
        """Written once each: a delivery already there (a retried write) is left as it is.
        In `session`'s transaction if given; held for the end `held_by` if given."""
        if not deliveries:
            return
        writes = [
            UpdateOne({"_id": d.delivery_id}, {"$setOnInsert": _document(d, held_by)}, upsert=True)
            for d in deliveries
        ]
        with reachable():
            await self._outbox.bulk_write(writes, ordered=False, session=session)

    async def release(self, end_id: str) -> None:
        """The end `end_id` is written: its deliveries may be claimed."""
        with reachable():
            await self._outbox.update_many({"held_by": end_id}, {"$unset": {"held_by": ""}})

    async def drop(self, end_id: str) -> None:
        """The end `end_id` was never written (its turn ended otherwise): nothing is owed."""
        with reachable():
            await self._outbox.delete_many({"held_by": end_id})

    async def claim_deliveries(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Delivery]:
        await self._resolve_held(now)
        claimed = []
        due = {
            "status": str(DeliveryStatus.PENDING),
            "next_attempt_at": {"$lte": now},
            "held_by": {"$exists": False},
            "$or": [{"lease_until": None}, {"lease_until": {"$lt": now}}],
        }
        with reachable():
            for _ in range(limit):
                document = await self._outbox.find_one_and_update(
                    due,
                    {"$set": {"lease_owner": owner, "lease_until": lease_until}},
                    sort=[("next_attempt_at", ASCENDING)],
                    return_document=ReturnDocument.AFTER,
                )
                if document is None:
                    break
                claimed.append(_delivery(document))
        return claimed

    async def _resolve_held(self, now: float) -> None:
        """Deliveries a crash left held (see the module's docstring): released when their
        turn names their end, dropped when it ended otherwise, kept while it still streams."""
        query = {"held_by": {"$exists": True}, "created_at": {"$lt": now - HELD_GRACE}}
        with reachable():
            cursor = self._outbox.find(query, {"held_by": 1, "message_id": 1}).limit(HELD_BATCH)
            held = {(d["held_by"], d["message_id"]) for d in await cursor.to_list(None)}
            for end_id, message_id in held:
                fields = {"status": 1, "end_id": 1}
                turn = await self._messages.find_one({"_id": message_id}, fields)
                if turn is not None and turn.get("end_id") == end_id:
                    await self.release(end_id)
                elif turn is None or turn.get("status") != STREAMING:
                    await self.drop(end_id)

    async def settle_delivery(self, delivery: Delivery) -> bool:
        with reachable():
            result = await self._outbox.update_one(
                {"_id": delivery.delivery_id, "lease_owner": delivery.lease_owner},
                {
                    "$set": {
                        "status": str(delivery.status),
                        "attempts": delivery.attempts,
                        "next_attempt_at": delivery.next_attempt_at,
                        "last_error": delivery.last_error,
                        "lease_owner": None,
                        "lease_until": None,
                    }
                },
            )
        return int(result.modified_count) == 1

    async def deliveries(self, status: DeliveryStatus | None, limit: int) -> list[Delivery]:
        if limit <= 0:
            return []
        query = {"status": str(status)} if status else {}
        with reachable():
            cursor = self._outbox.find(query).sort("created_at", DESCENDING).limit(limit)
            return [_delivery(document) for document in await cursor.to_list(None)]

    async def redeliver(self, delivery_id: str, now: float) -> bool:
        with reachable():
            result = await self._outbox.update_one(
                {"_id": delivery_id},
                {
                    "$set": {
                        "status": str(DeliveryStatus.PENDING),
                        "attempts": 0,
                        "next_attempt_at": now,
                        "last_error": None,
                        "lease_owner": None,
                        "lease_until": None,
                    }
                },
            )
        return int(result.matched_count) == 1


def _document(delivery: Delivery, held_by: str | None = None) -> dict[str, Any]:
    """Its fields but the id (`_id`, the upsert's key)."""
    document = asdict(delivery)
    del document["delivery_id"]
    document["status"] = str(delivery.status)
    if held_by is not None:
        document["held_by"] = held_by
    return document


def _delivery(document: dict[str, Any]) -> Delivery:
    values = dict(document)
    values.pop("held_by", None)
    values["delivery_id"] = values.pop("_id")
    values["status"] = DeliveryStatus(values["status"])
    return Delivery(**values)
