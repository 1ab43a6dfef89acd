"""The webhook transport's configuration: `[[webhooks]]` endpoints and `[webhook_delivery]`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from core.config import Config, ConfigError, HttpUrlText
from core.events import LIFECYCLE_EVENTS
from core.validation import first_problem

HOOKS = tuple(event.hook for event in LIFECYCLE_EVENTS)


class Endpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: HttpUrlText
    secret_env: str = Field(description="environment variable holding whsec_... secret(s)")
    events: list[str] = ["chat_completed", "chat_failed"]

    @field_validator("events")
    @classmethod
    def _known_events(cls, events: list[str]) -> list[str]:
        unknown = sorted(set(events) - set(HOOKS))
        if unknown:
            raise ValueError(f"unknown events {unknown} (known: {', '.join(HOOKS)})")
        return events


class Delivery(BaseModel):
    # TOML has nan and inf: neither is a delay the loop can sleep on or the store can keep.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    timeout_seconds: float = Field(10.0, gt=0, description="for one attempt")
    # Seconds between attempts (then jittered); after the last, the delivery is dead.
    schedule: list[Annotated[float, Field(ge=0)]] = Field(
        [5, 30, 120, 600, 1800, 7200], min_length=1
    )
    lease_seconds: float = Field(60.0, gt=0, description="a claim expires after this")
    poll_seconds: float = Field(1.0, gt=0, description="how often the outbox is read")
    concurrency: int = Field(32, gt=0, description="deliveries in flight at once")
    per_destination: int = Field(
        4, gt=0, description="deliveries in flight at once to one scheme://host:port"
    )
    max_retry_after_seconds: float = Field(
        3600.0, ge=0, description="a receiver's Retry-After is waited for at most this long"
    )


def endpoints(config: Config) -> list[Endpoint]:
    try:
        return TypeAdapter(list[Endpoint]).validate_python(config.webhooks)
    except ValidationError as exc:
        raise ConfigError(first_problem(exc, "webhooks")) from None


def delivery(config: Config) -> Delivery:
    try:
        return Delivery.model_validate(config.webhook_delivery)
    except ValidationError as exc:
        raise ConfigError(first_problem(exc, "webhook_delivery")) from None


def event_type(hook: str) -> str:
    """`chat_completed` -> `chat.completed`: the dotted names Standard Webhooks uses."""
    return hook.replace("_", ".", 1)
