"""OpenAI's Chat Completions wire format: `POST /v1/chat/completions` and `GET /v1/models`,
so every OpenAI SDK is a chatbus client. The same chat service runs underneath (history,
events, webhooks); chatbus's own fields ride as extra body fields.

The last message is the query; the ones before it are the history, used as is. When none
of them is a user's or an assistant's (system messages are instructions), `conversation_id`
and `history_len` read stored turns after them, as on `/chat/chat`.
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, where `code`
is chatbus's error type.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.chat import ChatService
from core.errors import UnknownModel
from core.history import StoreUnavailable
from core.hookspecs import hookimpl
from core.keys import CONFIG, SERVICE
from core.openapi import Content, ResponseModel, operation
from core.providers import ProviderError, ShuttingDown
from core.routes import caller_of
from core.schemas import ChatRequest
from core.turn import ChatTurn, TurnResult
from core.validation import problem_of
from core.web import ApiError, answer_errors_as, json_response, read_body
from plugins.transports.frames import BurstWriter, stream_turn

SEPARATOR = b"\n\n"  # what OpenAI sends
DONE = b"data: [DONE]" + SEPARATOR


class CompletionMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_of(cls, content: object) -> object:
        """A list of content parts becomes their text, one part a line; None is ""."""
        if content is None:
            return ""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ValueError('only text parts {"type": "text", "text": "..."} are supported')
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's request body, the fields chatbus uses; any other is ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the configured default model
    messages: list[CompletionMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name: wins over max_tokens
    # chatbus's own fields
    conversation_id: str = ""
    history_len: int = -1
    prompt_name: str = "default"


class OpenAIErrorDetail(ResponseModel):
    message: str
    type: str  # invalid_request_error, rate_limit_error or api_error
    param: str | None
    code: str  # chatbus's error type


class TurnIds(ResponseModel):
    message_id: str
    conversation_id: str


class FailedTurn(TurnIds):
    text: str  # what the model said before it failed


class OpenAIError(ResponseModel):
    """OpenAI's error object."""

    error: OpenAIErrorDetail
    chatbus: FailedTurn | None = None  # a failed answer's turn


class ChatbusFailure(OpenAIError):
    """The model failed, after chatbus's own retries and fallbacks (`x-should-retry: false`):
    OpenAI's error object, and the turn under `chatbus`."""


class AssistantMessage(ResponseModel):
    role: Literal["assistant"]
    content: str


class Choice(ResponseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class TokenUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(ResponseModel):
    """The whole answer (`stream` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str  # the model that answered
    choices: list[Choice]
    usage: TokenUsage
    chatbus: TurnIds


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(ResponseModel):
    """The configured models, in OpenAI's shape."""

    object: Literal["list"]
    data: list[ModelCard]


COMPLETION_CHUNKS = Content(
    "text/event-stream",
    "The answer streamed (`stream` true): `data: <chat.completion.chunk>` frames, the usage"
    " chunk when `stream_options.include_usage`, an error object if the model fails, then"
    " `data: [DONE]`.",
)


@hookimpl
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_get("/v1/models", list_models)
    answer_errors_as(app, "/v1/", openai_error, OpenAIError)


def openai_error(error: ApiError) -> web.Response:
    """Every error under /v1/ before a response began, in OpenAI's shape: a missing key's 401
    and an unknown path's 404 too."""
    if isinstance(error.cause, UnknownModel):  # OpenAI answers an unknown model with a 404
        known = ", ".join(error.cause.known)
        message = f"model: the model '{error.cause.name}' does not exist (configured: {known})"
        return error_response(404, "model_not_found", message, "model")
    status = 400 if error.status == 422 else error.status  # OpenAI: every bad input is 400
    return error_response(status, error.type, error.message, error.field, error.headers)


NO_SDK_RETRY = {"x-should-retry": "false"}
FAILED_STATUS = 502  # an upstream failure
SHUTTING_DOWN_STATUS = 503  # cut short by a shutdown


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    if status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "api_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return json_response({**error_body(status, code, message, param), **extra}, status, headers)


@operation("The configured models", responses={200: ModelList}, tags=["openai"])
async def list_models(request: web.Request) -> web.Response:
    names = request.app[SERVICE].models.names
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "chatbus"} for name in names]
    return json_response({"object": "list", "data": data})


@operation(
    "Chat, OpenAI's way",
    request=CompletionRequest,
    responses={200: (ChatCompletion, COMPLETION_CHUNKS)},
    errors={
        400: "An invalid body (OpenAI answers every bad input with 400).",
        404: "An unknown model.",
        502: ChatbusFailure,
        503: "The history store is unavailable, or chatbus is shutting down.",
    },
    tags=["openai"],
)
async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    service = request.app[SERVICE]
    body = await read_body(request, CompletionRequest)
    model = body.model or service.default_model
    chat_request = to_chat_request(body, model, config.chat.max_query_chars)
    async with service.start(chat_request, caller_of(request)) as turn:
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return await stream(request, service, turn, include_usage)
        return await complete(service, turn)


async def complete(service: ChatService, turn: ChatTurn) -> web.Response:
    """The whole answer as one chat.completion body."""
    result = await turn.run()
    ids = {"message_id": result.message_id, "conversation_id": turn.record.conversation_id}
    if result.error is not None:
        # chatbus's own retries and fallbacks (as the model's config says) have run: the SDKs'
        # retries (they honour this header) would only start the failed turn again, as new turns.
        return error_response(
            failed_status(result.error),
            result.error.type,
            str(result.error),
            headers=NO_SDK_RETRY,
            chatbus={**ids, "text": result.text},
        )
    return json_response(
        {
            "id": "chatcmpl-" + result.message_id,
            "object": "chat.completion",
            "created": int(turn.record.created_at),
            "model": result.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": await usage_of(service, turn),
            "chatbus": ids,
        }
    )


def to_chat_request(body: CompletionRequest, model: str, max_query_chars: int) -> ChatRequest:
    """The last message is the query, the ones before it the history."""
    *earlier, last = body.messages
    last_index = len(earlier)
    if last.role != "user":
        raise ApiError(
            400,
            "validation_error",
            "messages: the last message must be the user's",
            field="messages",
        )
    data: dict[str, Any] = {
        "query": last.content,
        "history": [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in earlier
        ],
        "conversation_id": body.conversation_id,
        "history_len": body.history_len,
        "stream": body.stream,
        "model_name": model,
        "max_tokens": (
            body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        ),
        "prompt_name": body.prompt_name,
    }
    if body.temperature is not None:
        data["temperature"] = body.temperature
    try:
        return ChatRequest.model_validate(data, context={"max_query_chars": max_query_chars})
    except ValidationError as exc:
        problem = problem_of(exc)
        param = {"query": f"messages.{last_index}.content"}.get(problem.field, problem.field)
        message = f"{param}: {problem.message}"
        raise ApiError(400, "validation_error", message, field=param) from None


async def stream(
    request: web.Request, service: ChatService, turn: ChatTurn, include_usage: bool
) -> web.StreamResponse:
    config = request.app[CONFIG]
    response = EventSourceResponse(
        allow_all_methods=True, ping_interval=config.chat.keepalive_seconds
    )
    await response.prepare(request)
    chunk = {
        "id": "chatcmpl-" + turn.message_id,
        "object": "chat.completion.chunk",
        "created": int(turn.record.created_at),
        "model": turn.record.model,  # the model asked for; the last chunk names who answered
    }
    # Every delta is the same chunk around its text: encode the rest once, splice it in.
    head = b"data: " + orjson.dumps(chunk)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
    tail = b'},"finish_reason":null}]}' + SEPARATOR
    frames = BurstWriter(response, head, tail)
    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}}

    async def ending(result: TurnResult) -> bytes:
        return await closing(service, turn, result, chunk, include_usage)

    async with response:  # stops the keep-alive pings, whatever happens
        with contextlib.suppress(ConnectionResetError):  # if gone, the first delta says so
            await response.write(frame({**chunk, "choices": [{**opening, "finish_reason": None}]}))
        await stream_turn(frames, turn, ending)
    return response


async def closing(
    service: ChatService,
    turn: ChatTurn,
    result: TurnResult,
    chunk: dict[str, Any],
    include_usage: bool,
) -> bytes:
    """The frames after the last delta: the finish (or the error), usage, [DONE]."""
    if result.error is not None:
        error = error_body(failed_status(result.error), result.error.type, str(result.error))
        return frame(error) + DONE
    chunk = {**chunk, "model": result.model}
    finish = frame({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if include_usage:
        finish += frame({**chunk, "choices": [], "usage": await usage_of(service, turn)})
    return finish + DONE


def failed_status(error: ProviderError) -> int:
    return SHUTTING_DOWN_STATUS if isinstance(error, ShuttingDown) else FAILED_STATUS


def frame(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + SEPARATOR


async def usage_of(service: ChatService, turn: ChatTurn) -> dict[str, int]:
    """The token counts stored with the turn; zeros when unknown."""
    try:
        record = await service.store.get_message(turn.record.tenant, turn.message_id)
    except StoreUnavailable:
        record = None
    usage = record.usage if record is not None else None
    prompt = (usage.prompt_tokens or 0) if usage is not None else 0
    completion = (usage.completion_tokens or 0) if usage is not None else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
