"""The webhook transport's settings, its `[plugins.webhooks]` table: the endpoints
(`[[plugins.webhooks.endpoints]]`), the delivery schedule (`[plugins.webhooks.delivery]`)
and the hosts an async chat may be called back on."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.config import Config, HttpUrlText, plugin_settings
from core.events import LIFECYCLE_EVENTS
from core.hosts import check_authorities

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


class WebhookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[Endpoint] = []
    delivery: Delivery = Delivery()
    # Async chats: a request's `callback_url` must name one of these (no SSRF): `host`,
    # `host:port`, `[v6]` or `[v6]:port`; a bare host allows only its scheme's default port
    # (80 for http, 443 for https). The answer is delivered there signed with the secret(s)
    # in `callback_secret_env`.
    callback_hosts: list[str] = []
    callback_secret_env: str = "CHATBUS_CALLBACK_SECRET"

    @field_validator("callback_hosts")
    @classmethod
    def _hosts_and_ports(cls, hosts: list[str]) -> list[str]:
        return check_authorities(hosts)


NAME = "webhooks"  # the plugin's table: [plugins.webhooks]
_validated: dict[int, tuple[Config, WebhookSettings]] = {}


def settings(config: Config) -> WebhookSettings:
    """The `[plugins.webhooks]` table, validated once per configuration (every event asks)."""
    known = _validated.get(id(config))
    if known is None or known[0] is not config:
        known = (config, plugin_settings(config, NAME, WebhookSettings))
        _validated[id(config)] = known
    return known[1]


def unset_secrets(settings: WebhookSettings) -> list[str]:
    """The secrets the settings need that the environment lacks, as `key: problem` lines:
    each endpoint's, and the callbacks' while any host may be called back."""
    needed = [(f"endpoints.{n}.secret_env", e.secret_env) for n, e in enumerate(settings.endpoints)]
    if settings.callback_hosts:
        needed.append(("callback_secret_env", settings.callback_secret_env))
    return [
        f"plugins.{NAME}.{key}: the environment variable {variable} is not set"
        for key, variable in needed
        if not os.environ.get(variable, "").strip()
    ]


def event_type(hook: str) -> str:
    """`chat_completed` -> `chat.completed`: the dotted names Standard Webhooks uses."""
    return hook.replace("_", ".", 1)
