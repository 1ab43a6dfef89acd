"""chatchat's `POST /chat/feedback`: a rating of one answer, 0 to 100, and why."""

from __future__ import annotations

from aiohttp import web
from pydantic import Field

from core.keys import SERVICE
from core.openapi import operation
from core.routes import caller_of
from core.web import json_response, read_body
from plugins.transports.chatchat.schemas import ChatchatBody
from plugins.transports.chatchat.webui import ChatchatReply


class FeedbackRequest(ChatchatBody):
    message_id: str = Field(min_length=1, max_length=64)
    score: int = Field(ge=0, le=100)
    reason: str = Field("", max_length=10_000)


@operation(
    "Rate an answer",
    request=FeedbackRequest,
    responses={200: ChatchatReply},
    errors={404: "No such message.", 422: "An invalid field.", 503: "The store is unavailable."},
    tags=["chatchat"],
)
async def feedback(request: web.Request) -> web.Response:
    """200 `{"code": 200, "msg", "data": null}`, as chatchat answers; an unknown message is a
    404 (chatchat's own server answers 200 and records nothing)."""
    body = await read_body(request, FeedbackRequest)
    await request.app[SERVICE].feedback(
        caller_of(request), body.message_id, body.score, body.reason
    )
    message = f"feedback recorded for {body.message_id}"
    return json_response({"code": 200, "msg": message, "data": None})
