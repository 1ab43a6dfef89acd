"""The durable outbox: deliveries an event owes the outside world (webhooks), kept in the
history store so a crash or restart loses none, and claimed with a lease so that several
instances on one store never deliver the same one at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # due at `next_attempt_at`
    DELIVERED = "delivered"
    STOPPED = "stopped"  # the receiver refused it (a 4xx other than 408 and 429)
    DEAD = "dead"  # every attempt of the schedule failed


@dataclass(slots=True)
class Delivery:
    delivery_id: str  # the `webhook-id`: the same on every attempt, receivers dedupe on it
    url: str
    event_type: str  # e.g. "chat.completed"
    payload: str  # the JSON body, exactly as signed and sent
    secret_env: str  # the environment variable holding the signing secret(s), never a secret
    message_id: str = ""
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    created_at: float = 0.0
    lease_owner: str | None = None
    lease_until: float | None = None


class Outbox(Protocol):
    """Where a history store keeps deliveries (its `outbox`). Unreachable storage raises
    `StoreUnavailable` (core/history.py)."""

    async def add_deliveries(self, deliveries: Sequence[Delivery]) -> None: ...

    async def claim_deliveries(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Delivery]:
        """Lease up to `limit` pending deliveries due by `now` whose lease is free or has
        expired, atomically: no two claimers get the same one while its lease runs."""
        ...

    async def settle_delivery(self, delivery: Delivery) -> bool:
        """Write an attempt's result (status, attempts, next_attempt_at, last_error) and free
        the lease, if `delivery.lease_owner` still holds it; whether it did."""
        ...

    async def deliveries(self, status: DeliveryStatus | None, limit: int) -> list[Delivery]:
        """The newest first."""
        ...

    async def redeliver(self, delivery_id: str, now: float) -> bool:
        """Make a delivery pending again, due now, with its attempts reset."""
        ...
