"""`GET /metrics` in Prometheus' text format: requests by route and status, time to first
token and total latency by model, tokens out, active streams (and what other plugins add
to the app's registry: webhook deliveries by outcome). The counts come from lifecycle
events and one middleware, never from per-token work."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from core.events import ChatEnded, ChatStarted
from core.hookspecs import hookimpl
from core.keys import METRICS, PLUGINS
from core.openapi import Content, operation
from core.web import ApiError

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Registered with the app's plugin manager: it hears every chat's events."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("chatbus_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)  # fmt: skip
        self.first_token = Histogram(
            "chatbus_time_to_first_token_seconds", "From the model call to the first delta",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "chatbus_chat_latency_seconds", "From the model call to the end of the answer",
            ["model", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter("chatbus_tokens_out", "Completion tokens the models reported",
                              ["model"], registry=self.registry)  # fmt: skip
        self.active = Gauge("chatbus_active_chats", "Chats whose answer is being produced",
                            registry=self.registry)  # fmt: skip
        # Each series once found, not looked up (under prometheus_client's lock) per chat; it
        # keeps every series it has made anyway.
        self._requests = functools.cache(self.requests.labels)
        self._latency = functools.cache(self.latency.labels)
        self._first_token = functools.cache(self.first_token.labels)
        self._tokens = functools.cache(self.tokens.labels)

    @web.middleware
    async def count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except (web.HTTPException, ApiError) as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first
            raise
        finally:
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            self._requests(name, request.method, str(status)).inc()

    @hookimpl
    def chat_started(self, event: ChatStarted) -> None:
        self.active.inc()

    def _ended(self, event: ChatEnded, status: str) -> None:
        self.active.dec()
        self._latency(event.model, status).observe(event.latency)
        if event.first_token_latency is not None:
            self._first_token(event.model).observe(event.first_token_latency)
        if event.usage is not None and event.usage.completion_tokens:
            self._tokens(event.model).inc(event.usage.completion_tokens)

    @hookimpl
    def chat_completed(self, event: ChatEnded) -> None:
        self._ended(event, "completed")

    @hookimpl
    def chat_failed(self, event: ChatEnded) -> None:
        self._ended(event, "failed")

    @hookimpl
    def chat_cancelled(self, event: ChatEnded) -> None:
        self._ended(event, "cancelled")

    @hookimpl
    def register_middlewares(self, app: web.Application, register: Any) -> None:
        if app[METRICS] is self.registry:  # this app's, not another's in the same process
            register(self.count)

    @operation(
        "Prometheus metrics",
        responses={200: Content(CONTENT_TYPE_LATEST.split(";")[0], "Prometheus' text format.")},
        tags=["health"],
    )
    async def handle(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@hookimpl
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    metrics = Metrics(app[METRICS])
    app[PLUGINS].register(metrics, f"metrics-{id(app)}-{time.monotonic_ns()}")
    router.add_get("/metrics", metrics.handle)
