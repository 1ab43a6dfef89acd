"""The deliverer: claims due deliveries from the outbox with a lease, signs and POSTs them.

2xx: delivered. 408, 429 (its Retry-After honoured, up to `max_retry_after_seconds`), 5xx,
timeouts and connection errors: tried again after the next delay of the schedule, with
jitter; after the last, dead. Any other answer (other 4xx, and redirects, which are never
followed): stopped.

Concurrency: at most `concurrency` attempts are in flight in all and `per_destination` to
one scheme://host:port, so a slow or failing receiver cannot starve the others. The loop
claims no more than the free slots, and claims again as soon as one frees, never waiting for
a batch. A claimed delivery whose destination is at its limit is released at once, unchanged
but due a poll later: it holds neither a slot nor a lease while it waits, and the next claim
reaches the deliveries behind it. (Queueing it in memory instead would keep its lease
running out while it waits, and another instance would then send it too.) The price is a
claim and a release per poll for each due delivery of a saturated destination.

Nothing ends the loop but `stop`: an exception in one attempt (a bug, a URL or secret that
cannot be used) is logged and counts as a failed attempt; one while recording it is logged
and leaves the delivery to its lease (tried again when it runs out); a failed claim is
logged and claimed again after a poll. `stop(within)` first delivers what is due (at once,
without waiting for a poll: the ends of the turns a shutdown cut among them) for up to
`within` seconds, then abandons the attempts in flight to their lease: they are tried again
later, never lost.
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
from yarl import URL

from core.history import StoreUnavailable
from core.outbox import Delivery, DeliveryStatus, Outbox
from core.retry_after import retry_after_seconds
from plugins.transports.webhook.options import Delivery as Settings

log = structlog.get_logger("chatbus.webhooks")
RETRY_STATUSES = {408, 429}


class Deliverer:
    def __init__(self, outbox: Outbox, settings: Settings, registry: CollectorRegistry) -> None:
        self.outbox = outbox
        self.settings = settings
        self.owner = f"chatbus-{uuid.uuid4().hex[:12]}"  # this instance, in leases
        self.counts: Counter[str] = Counter()
        self.attempts = metrics.Counter(
            "chatbus_webhook_deliveries", "Webhook delivery attempts by outcome",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._in_flight: dict[asyncio.Task[None], str] = {}  # attempt -> its destination
        self._busy: Counter[str] = Counter()  # attempts in flight per destination
        self._slot_freed = asyncio.Event()
        self._stopping = False  # deliver what is due, then end the loop

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self._task = asyncio.create_task(self._run())

    async def stop(self, within: float = 0.0) -> None:
        if self._task is not None and within > 0:
            self._stopping = True
            self._slot_freed.set()  # claim now, not after a poll
            await asyncio.wait({self._task}, timeout=within)
        tasks = [task for task in (self._task, *self._in_flight) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        if self.counts:  # nothing to say when nothing was attempted (no webhooks, say)
            log.info("webhook deliveries", owner=self.owner, **self.counts)

    async def _run(self) -> None:
        while True:
            self._slot_freed.clear()  # before counting: a slot freed from here on wakes us
            stopping = self._stopping  # before the claim: it sees every delivery written by then
            free = self.settings.concurrency - len(self._in_flight)
            claimed = await self._claim(free) if free > 0 else []
            for delivery in claimed:
                await self._start_or_defer(delivery)
            if stopping and not claimed and not self._in_flight:
                return  # nothing was due, and nothing is on its way
            if free <= 0 or len(claimed) < free:  # else more may be due at once
                await self._wait_for_a_slot_or_a_poll()

    async def _claim(self, limit: int) -> list[Delivery]:
        now = time.time()
        try:
            return await self.outbox.claim_deliveries(
                self.owner, now=now, lease_until=now + self.settings.lease_seconds, limit=limit
            )
        except StoreUnavailable as exc:
            log.warning("outbox unreachable", error=str(exc))
        except Exception as exc:
            log.error("could not claim webhook deliveries", error=describe(exc))
        return []

    async def _start_or_defer(self, delivery: Delivery) -> None:
        where = destination(delivery.url)
        if self._busy[where] >= self.settings.per_destination:
            delivery.next_attempt_at = time.time() + self.settings.poll_seconds
            await self._record(delivery)  # released: it waits in the outbox, not here
            return
        self._busy[where] += 1
        task = asyncio.create_task(self._attempt(delivery))
        self._in_flight[task] = where
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        where = self._in_flight.pop(task)
        self._busy[where] -= 1
        if not self._busy[where]:
            del self._busy[where]  # callback hosts come and go: keep only the busy ones
        self._slot_freed.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("webhook attempt crashed", error=describe(exc))  # left to its lease

    async def _wait_for_a_slot_or_a_poll(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.poll_seconds):
                await self._slot_freed.wait()

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
        # Given up for good, or failing for want of a secret: someone has to act.
        given_up = delivery.status in (DeliveryStatus.DEAD, DeliveryStatus.STOPPED)
        say = log.warning if given_up or not _secrets(delivery) else log.info
        say("webhook attempt", delivery_id=delivery.delivery_id, url=delivery.url,
            attempt=delivery.attempts, outcome=str(delivery.status), error=error)  # fmt: skip
        await self._record(delivery)

    async def _record(self, delivery: Delivery) -> None:
        """Settle the delivery; when that fails its lease runs out and it is tried again."""
        try:
            await self.outbox.settle_delivery(delivery)
        except StoreUnavailable as exc:
            log.warning("could not record a webhook attempt", delivery_id=delivery.delivery_id,
                        error=str(exc))  # fmt: skip
        except Exception as exc:
            log.error("could not record a webhook attempt", delivery_id=delivery.delivery_id,
                      error=describe(exc))  # fmt: skip

    async def _post(self, delivery: Delivery) -> tuple[int | None, str | None, str | None]:
        """(HTTP status or None, error text or None, Retry-After or None)."""
        try:
            return await self._send(delivery)
        except TimeoutError:
            return None, f"no answer in {self.settings.timeout_seconds} s", None
        except aiohttp.ClientError as exc:
            return None, describe(exc), None
        except Exception as exc:  # a bug, or a URL or secret nothing can send with
            log.error("webhook attempt failed unexpectedly", delivery_id=delivery.delivery_id,
                      error=describe(exc))  # fmt: skip
            return None, describe(exc), None

    async def _send(self, delivery: Delivery) -> tuple[int | None, str | None, str | None]:
        assert self._http is not None
        secrets = _secrets(delivery)
        if not secrets:
            return None, f"the environment variable {delivery.secret_env} is not set", None
        headers = sign(delivery, secrets, datetime.now(UTC))
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        async with self._http.post(
            delivery.url, data=delivery.payload.encode(), headers=headers,
            timeout=timeout, allow_redirects=False,
        ) as response:  # fmt: skip
            ok = 200 <= response.status < 300
            return (
                response.status,
                None if ok else f"HTTP {response.status}",
                response.headers.get("Retry-After"),
            )

    def _delay(self, attempts: int, retry_after: str | None) -> float:
        asked = retry_after_seconds(retry_after, self.settings.max_retry_after_seconds)
        if asked is not None:
            return asked
        return self.settings.schedule[attempts - 1] * random.uniform(0.8, 1.2)


def _secrets(delivery: Delivery) -> list[str]:
    """The delivery's signing secrets (several while one is rotated), read at each attempt."""
    return os.environ.get(delivery.secret_env, "").split()


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


def destination(url: str) -> str:
    """scheme://host:port, what `per_destination` limits; a URL that does not parse is a
    destination of its own (its attempt fails and says why)."""
    try:
        parsed = URL(url)
        return f"{parsed.scheme}://{parsed.host}:{parsed.port}"
    except ValueError:
        return url


def describe(exc: BaseException) -> str:
    """An exception as an error text for logs and `last_error`: its type and message, never
    a traceback (whose locals may hold a signing secret)."""
    return f"{type(exc).__name__}: {exc}"[:300]
