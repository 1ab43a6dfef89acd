"""The deliverer: claims due deliveries from the outbox with a lease, signs and POSTs them.

2xx: delivered. 408, 429 (its Retry-After honoured), 5xx, timeouts and connection errors:
tried again after the next delay of the schedule, with jitter; after the last, dead. Any
other answer (other 4xx, and redirects, which are never followed): stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import uuid
from collections import Counter
from datetime import UTC, datetime

import aiohttp
import prometheus_client as metrics
import structlog
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook

from core.history import HistoryStore, StoreUnavailable
from core.outbox import Delivery, DeliveryStatus
from plugins.transports.webhook.options import Delivery as Settings

log = structlog.get_logger("chatbus.webhooks")
RETRY_STATUSES = {408, 429}


class Deliverer:
    def __init__(
        self, store: HistoryStore, settings: Settings, registry: CollectorRegistry
    ) -> None:
        self.store = store
        self.settings = settings
        self.owner = f"chatbus-{uuid.uuid4().hex[:12]}"  # this instance, in leases
        self.counts: Counter[str] = Counter()
        self.attempts = metrics.Counter(
            "chatbus_webhook_deliveries", "Webhook delivery attempts by outcome",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()
        log.info("webhook deliveries", owner=self.owner, **self.counts)

    async def _run(self) -> None:
        while True:
            try:
                claimed = await self.store.claim_deliveries(
                    self.owner,
                    now=time.time(),
                    lease_until=time.time() + self.settings.lease_seconds,
                    limit=self.settings.concurrency,
                )
            except StoreUnavailable as exc:
                log.warning("outbox unreachable", error=str(exc))
                claimed = []
            if claimed:
                await asyncio.gather(*(self._attempt(d) for d in claimed))
            else:
                await asyncio.sleep(self.settings.poll_seconds)

    async def _attempt(self, delivery: Delivery) -> None:
        status, error, retry_after = await self._post(delivery)
        delivery.attempts += 1
        if status is not None and 200 <= status < 300:
            delivery.status, delivery.last_error = DeliveryStatus.DELIVERED, None
        elif status is not None and not _retryable(status):
            delivery.status, delivery.last_error = DeliveryStatus.STOPPED, error
        elif delivery.attempts > len(self.settings.schedule):
            delivery.status, delivery.last_error = DeliveryStatus.DEAD, error
        else:
            delivery.last_error = error
            delivery.next_attempt_at = time.time() + self._delay(delivery.attempts, retry_after)
        outcome = str(delivery.status) if delivery.status != "pending" else "retrying"
        self.counts[outcome] += 1
        self.attempts.labels(outcome).inc()
        log.info("webhook attempt", delivery_id=delivery.delivery_id, url=delivery.url,
                 attempt=delivery.attempts, outcome=str(delivery.status), error=error)  # fmt: skip
        try:
            await self.store.settle_delivery(delivery)
        except StoreUnavailable as exc:  # the lease runs out and it is tried again
            log.warning("could not record a webhook attempt", delivery_id=delivery.delivery_id,
                        error=str(exc))  # fmt: skip

    async def _post(self, delivery: Delivery) -> tuple[int | None, str | None, str | None]:
        """(HTTP status or None, error text or None, Retry-After or None)."""
        assert self._http is not None
        secrets = os.environ.get(delivery.secret_env, "").split()
        if not secrets:
            return None, f"the environment variable {delivery.secret_env} is not set", None
        headers = sign(delivery, secrets, datetime.now(UTC))
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        try:
            async with self._http.post(
                delivery.url, data=delivery.payload.encode(), headers=headers,
                timeout=timeout, allow_redirects=False,
            ) as response:  # fmt: skip
                ok = 200 <= response.status < 300
                return (
                    response.status,
                    None if ok else f"HTTP {response.status}",
                    (response.headers.get("Retry-After")),
                )
        except TimeoutError:
            return None, f"no answer in {self.settings.timeout_seconds} s", None
        except aiohttp.ClientError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300], None

    def _delay(self, attempts: int, retry_after: str | None) -> float:
        if retry_after:
            with contextlib.suppress(ValueError):
                return max(float(retry_after), 0.0)
        return self.settings.schedule[attempts - 1] * random.uniform(0.8, 1.2)


def sign(delivery: Delivery, secrets: list[str], at: datetime) -> dict[str, str]:
    """Standard Webhooks headers; one signature per secret, so receivers keep verifying
    while a secret is being rotated."""
    signatures = " ".join(
        Webhook(secret).sign(delivery.delivery_id, at, delivery.payload) for secret in secrets
    )
    return {
        "Content-Type": "application/json",
        "User-Agent": "chatbus-webhooks",
        "webhook-id": delivery.delivery_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signatures,
    }


def _retryable(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500
