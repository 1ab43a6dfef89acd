"""Signed webhooks (Standard Webhooks 1.0) for lifecycle events, through a durable outbox.

`plan_deliveries` turns each event an endpoint of `[plugins.webhooks]` subscribes to into a delivery
the chat service writes to the store's outbox; the deliverer, started with the server,
claims due deliveries with a lease and POSTs them, retrying on its schedule.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from core.config import Config, ConfigError
from core.events import Event
from core.hookspecs import hookimpl
from core.ids import new_id
from core.keys import CONFIG, METRICS, SERVICE
from core.outbox import Delivery
from plugins.transports.webhook import options
from plugins.transports.webhook.callbacks import callback_problem
from plugins.transports.webhook.deliverer import Deliverer

END_EVENTS = ("chat_completed", "chat_failed", "chat_cancelled")


@hookimpl
def plan_deliveries(event: Event, config: Config) -> list[Delivery] | None:
    """One delivery per subscribed endpoint, and, for an async chat's end, one to its
    callback URL (checked by `check_callback` when it was asked)."""
    settings = options.settings(config)
    targets = [(e.url, e.secret_env) for e in settings.endpoints if event.hook in e.events]
    callback = getattr(event, "callback_url", None)
    if callback and event.hook in END_EVENTS:
        targets.append((callback, settings.callback_secret_env))
    if not targets:
        return None
    kind = options.event_type(event.hook)
    payload = orjson.dumps(
        {"type": kind, "timestamp": datetime.fromtimestamp(event.at, UTC), "data": _data(event)}
    ).decode()
    now = time.time()
    return [
        Delivery(
            delivery_id=f"msg_{new_id()}",
            url=url,
            event_type=kind,
            payload=payload,
            secret_env=secret_env,
            message_id=event.message_id,
            next_attempt_at=now,
            created_at=now,
        )
        for url, secret_env in targets
    ]


@hookimpl
def check_callback(url: str, config: Config) -> str | None:
    return callback_problem(url, options.settings(config).callback_hosts)


@hookimpl
def register_lifespans(app: web.Application, register: Any) -> None:
    settings = options.settings(app[CONFIG])  # a bad table stops start-up, in one line
    unset = options.unset_secrets(settings)
    if unset:  # else every delivery would fail, attempt after attempt, until it is dead
        raise ConfigError(unset[0])

    async def deliver_in_background(app: web.Application) -> AsyncIterator[None]:
        service = app[SERVICE]
        deliverer = Deliverer(service.store.outbox, settings.delivery, app[METRICS])
        await deliverer.start()
        yield
        # Stopping last: the turns' ends, and the deliveries they owe, are written first, so
        # that the ends of the turns a shutdown cut are delivered too, if there is time.
        await service.recorder.drain(service.cutoff.time_left())
        await deliverer.stop(within=service.cutoff.time_left())

    register(deliver_in_background)


def _data(event: Event) -> dict[str, object]:
    data = dataclasses.asdict(event)
    usage = getattr(event, "usage", None)
    if usage is not None:
        data["usage"] = usage.counts()  # OpenAI's names; details only when known
    if event.hook in END_EVENTS:
        data["status"] = event.hook.removeprefix("chat_")
    return data
