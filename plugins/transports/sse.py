"""chatchat's `/chat/chat` over Server-Sent Events (aiohttp-sse), or as one JSON body.

Frames are chatchat's exactly: `data: {"text": "<delta>", "message_id": "<id>"}` and a
blank line, one write per frame, no `event:` lines, `: ping` comments while the model is
silent. An error after the stream began is one last frame with an `error` object.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from core.hookspecs import hookimpl
from core.keys import CONFIG, SERVICE
from core.routes import caller_of
from core.schemas import ChatRequest
from core.turn import ClientDisconnected, TurnResult
from core.web import json_response, read_body
from plugins.transports.frames import FrameWriter

SEPARATOR = b"\r\n\r\n"  # what chatchat's own server (sse-starlette) sends


@hookimpl
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    router.add_post("/chat/chat", chat)


async def chat(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    body = await read_body(request, ChatRequest, max_query_chars=config.chat.max_query_chars)
    service = request.app[SERVICE]
    turn = await service.start(body, caller_of(request))
    if body.callback_url is not None:  # async mode: the answer goes to the callback
        service.spawn(turn.run())
        return json_response({"message_id": turn.message_id, "status": "accepted"}, 202)
    if not body.stream:
        result = await turn.run()
        if result.error is not None:
            return json_response({**_error(result), "text": result.text}, 502)
        return json_response({"text": result.text, "message_id": result.message_id})

    response = EventSourceResponse(
        allow_all_methods=True, ping_interval=config.chat.keepalive_seconds
    )
    await response.prepare(request)
    # The message id is the same in every frame: encode it once, splice each delta in.
    head = b'data: {"text":'
    tail = b',"message_id":"' + turn.message_id.encode() + b'"}' + SEPARATOR
    frames = FrameWriter(response, head, tail)

    async with response:
        try:
            result = await turn.run(frames.send)
            await frames.end(_error_frame(result))
        except ClientDisconnected:
            pass  # the turn is recorded as cancelled
        finally:
            frames.close()
    return response


def _error_frame(result: TurnResult) -> bytes:
    """The last frame of a stream that failed after it began; nothing if it did not fail."""
    return b"" if result.error is None else b"data: " + orjson.dumps(_error(result)) + SEPARATOR


def _error(result: TurnResult) -> dict[str, Any]:
    assert result.error is not None
    return {
        "text": "",
        "message_id": result.message_id,
        "error": {"type": result.error.type, "message": str(result.error)},
    }
