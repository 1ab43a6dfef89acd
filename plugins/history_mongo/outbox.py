"""The outbox in MongoDB: a collection next to the messages; each delivery is claimed by
an atomic find-and-modify, so no two instances hold one at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument

from core.outbox import Delivery, DeliveryStatus
from plugins.history_mongo.errors import reachable


class MongoOutbox:
    """The store's `outbox`: a collection beside its messages."""

    def __init__(self, collection: Any) -> None:
        self._outbox = collection

    async def create_indexes(self) -> None:
        await self._outbox.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="due"
        )

    async def add_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            with reachable():
                await self._outbox.insert_many([_document(d) for d in deliveries])

    async def claim_deliveries(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Delivery]:
        claimed = []
        due = {
            "status": str(DeliveryStatus.PENDING),
            "next_attempt_at": {"$lte": now},
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


def _document(delivery: Delivery) -> dict[str, Any]:
    document = asdict(delivery)
    document["_id"] = document.pop("delivery_id")
    document["status"] = str(delivery.status)
    return document


def _delivery(document: dict[str, Any]) -> Delivery:
    values = dict(document)
    values["delivery_id"] = values.pop("_id")
    values["status"] = DeliveryStatus(values["status"])
    return Delivery(**values)
