"""chatchat's `POST /chat/chat`: its frames exactly, streamed, or one JSON body.

Frames (chatchat 0.2.9 and later, `frames = "sse"`): `data: {"text": "<delta>",
"message_id": "<id>"}` and a blank line, no `event:` lines, `: ping` comments while the model
is silent. chatchat 0.2.0 to 0.2.8 (`frames = "json"`): each frame is a bare JSON object,
and there are no pings; every 0.2.x client reads that form too.

Every frame is its own write, so its own HTTP chunk: chatchat's client parses each chunk it
reads as exactly one frame (`json.loads(chunk[6:-2])`), and text is lost when two frames
share one. An error after the stream began is one last frame with an `error` object and
chatchat's `code` and `msg`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field

from core.keys import CONFIG, SERVICE
from core.openapi import Content, ResponseModel, operation
from core.providers import ProviderError, ShuttingDown
from core.routes import caller_of
from core.turn import ChatTurn, TurnResult
from core.web import ErrorDetail, json_response, read_body
from plugins.transports.chatchat.schemas import ChatRequest
from plugins.transports.frames import FrameWriter, stream_turn

log = structlog.get_logger("chatbus.chatchat")
SEPARATOR = b"\r\n\r\n"  # what chatchat's own server (sse-starlette) sends
FAILED_STATUS = 502  # an upstream failure: the status of an answer that is not streamed
SHUTTING_DOWN_STATUS = 503  # cut short by a shutdown: try again, elsewhere or later


class ChatchatSettings(BaseModel):
    """`[plugins.chatchat]`."""

    model_config = ConfigDict(extra="forbid")
    frames: Literal["sse", "json"] = "sse"  # "json": for chatchat 0.2.0 to 0.2.8 clients


@dataclass(frozen=True, slots=True)
class Framing:
    """How one frame is wrapped on the wire."""

    prefix: bytes
    suffix: bytes
    pings: bool

    @classmethod
    def of(cls, frames: str) -> Framing:
        if frames == "json":
            return cls(b"", b"", pings=False)
        return cls(b"data: ", SEPARATOR, pings=True)

    def frame(self, data: dict[str, Any]) -> bytes:
        return self.prefix + orjson.dumps(data) + self.suffix

    def response(self, keepalive_seconds: float) -> EventSourceResponse | BareJsonStream:
        if self.pings:
            return EventSourceResponse(allow_all_methods=True, ping_interval=keepalive_seconds)
        return BareJsonStream()


FRAMING = web.AppKey("chatchat_framing", Framing)


class BareJsonStream(web.StreamResponse):
    """chatchat 0.2.0 to 0.2.8's stream: JSON objects one after another, no pings."""

    def __init__(self) -> None:
        super().__init__(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def __aenter__(self) -> BareJsonStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class ChatchatChatRequest(ChatRequest):
    """The body as read here: `model` is OpenAI's name for chatchat's `model_name`, kept
    only to say that it is not read."""

    model: Any = Field(None, exclude=True)


class ChatAnswer(ResponseModel):
    """The whole answer (`stream` false)."""

    text: str
    message_id: str


class Accepted(ResponseModel):
    """Accepted (`callback_url` given): the end of the chat is delivered to the callback."""

    message_id: str
    status: Literal["accepted"]


class ChatFailure(ResponseModel):
    """The model failed (502) or chatbus is shutting down (503): what it said before, and
    chatbus's error with chatchat's `code` and `msg`. A stream's last frame, if it fails."""

    text: str
    message_id: str
    error: ErrorDetail
    code: int
    msg: str


ANSWER_FRAMES = Content(
    "text/event-stream",
    'The answer streamed (`stream` true): `data: {"text": "<delta>", "message_id": "<id>"}`'
    ' frames (bare JSON objects with `frames = "json"`), a last `ChatFailure` frame if the'
    " model fails.",
)


@operation(
    "Chat, chatchat 0.2.x's way",
    request=ChatRequest,
    responses={200: (ChatAnswer, ANSWER_FRAMES), 202: Accepted},
    errors={
        400: "Invalid JSON, an unknown model or prompt, or a callback URL not allowed.",
        422: "An invalid field (named by `error.field`).",
        502: ChatFailure,
        503: "The history store is unavailable, or chatbus is shutting down.",
    },
    tags=["chatchat"],
)
async def chat(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    body = await read_body(
        request, ChatchatChatRequest, max_query_chars=config.chat.max_query_chars
    )
    if body.model is not None and body.model_name is None:
        log.warning(
            "/chat/chat reads model_name, not model: the default model answers",
            model=str(body.model)[:100],
            default_model=config.default_model,
        )
    service = request.app[SERVICE]
    async with service.start(body.chat_input(), caller_of(request)) as turn:
        return await answer(request, turn, body)


async def answer(request: web.Request, turn: ChatTurn, body: ChatRequest) -> web.StreamResponse:
    """The turn's answer: in the background for a callback, as one body, or streamed."""
    config = request.app[CONFIG]
    if body.callback_url is not None:  # async mode: the answer goes to the callback
        turn.run_in_background()
        return json_response({"message_id": turn.message_id, "status": "accepted"}, 202)
    if not body.stream:
        result = await turn.run()
        if result.error is not None:
            frame = error_frame(result)
            return json_response({**frame, "text": result.text}, frame["code"])
        return json_response({"text": result.text, "message_id": result.message_id})

    framing = request.app[FRAMING]
    response = framing.response(config.chat.keepalive_seconds)
    await response.prepare(request)
    # The message id is the same in every frame: encode it once, splice each delta in.
    head = framing.prefix + b'{"text":'
    tail = b',"message_id":"' + turn.message_id.encode() + b'"}' + framing.suffix
    frames = FrameWriter(response, head, tail)

    async def closing(result: TurnResult) -> bytes:
        return b"" if result.error is None else framing.frame(error_frame(result))

    async with response:  # stops the keep-alive pings, whatever happens
        await stream_turn(frames, turn, closing)
    return response


def error_frame(result: TurnResult) -> dict[str, Any]:
    """The last frame of a stream that failed: chatbus's `error`, chatchat's `code`/`msg`."""
    assert result.error is not None
    message = str(result.error)
    return {
        "text": "",
        "message_id": result.message_id,
        "error": {"type": result.error.type, "message": message},
        "code": failed_status(result.error),
        "msg": message,
    }


def failed_status(error: ProviderError) -> int:
    return SHUTTING_DOWN_STATUS if isinstance(error, ShuttingDown) else FAILED_STATUS
