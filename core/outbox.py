"""The durable outbox: deliveries an event owes the outside world (webhooks), kept in the
history store so a crash or restart loses none, and claimed with a lease so that several
instances on one store never deliver the same one at once."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


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
