"""The HTTP routes core owns. The chat endpoints themselves come from transport plugins."""

from __future__ import annotations

import asyncio
from typing import Literal

from aiohttp import web

from core import conversations
from core.chat import Caller
from core.history import StoreUnavailable
from core.keys import SERVICE
from core.openapi import ResponseModel, operation
from core.web import REQUEST_ID, TENANT, json_response

READY_TIMEOUT = 3.0  # above a store's own time to say it is down (MongoDB: 2 s)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/models", models)
    router.add_get("/health/live", live)
    router.add_get("/health/ready", ready)
    conversations.add_routes(router, caller_of)


def caller_of(request: web.Request) -> Caller:
    return Caller(request_id=request[REQUEST_ID], tenant=request[TENANT])


class ModelInfo(ResponseModel):
    name: str
    provider: str  # the provider kind
    default: bool
    fallbacks: list[str]
    reachable: bool | None  # null until the model was called
    checked_at: float | None
    last_error: str | None


class ModelsList(ResponseModel):
    """The configured models."""

    models: list[ModelInfo]


class Live(ResponseModel):
    """The process answers."""

    status: Literal["live"]


class Readiness(ResponseModel):
    """Whether the history store answers."""

    status: Literal["ready", "unavailable"]
    store: str  # "ok", or what is wrong


@operation("The configured models", responses={200: ModelsList}, tags=["models"])
async def models(request: web.Request) -> web.Response:
    """The configured models, their provider kind and fallbacks, and whether each answered
    the last time it was called (`reachable` is null until then)."""
    service = request.app[SERVICE]
    return json_response({"models": service.models.describe(service.default_model)})


@operation("Liveness", responses={200: Live}, tags=["health"], public=True)
async def live(request: web.Request) -> web.Response:
    """The process answers."""
    return json_response({"status": "live"})


@operation(
    "Readiness",
    responses={200: Readiness},
    errors={503: Readiness},
    tags=["health"],
    public=True,
)
async def ready(request: web.Request) -> web.Response:
    """Ready to chat: the history store answers (within READY_TIMEOUT seconds)."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[SERVICE].store.ping()
    except (StoreUnavailable, TimeoutError) as exc:
        problem = str(exc) or "no answer in time"
        return json_response({"status": "unavailable", "store": problem}, 503)
    return json_response({"status": "ready", "store": "ok"})
