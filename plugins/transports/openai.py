"""OpenAI's Chat Completions wire format: `POST /v1/chat/completions` and `GET /v1/models`,
so every OpenAI SDK is a chatbus client. The same chat service runs underneath (history,
events, webhooks); chatbus's own fields ride as extra body fields.

The last message is the query; the ones before it are the history, used as is. When none
of them is a user's or an assistant's (system messages are instructions), `conversation_id`
and `history_len` read stored turns after them, as on `/chat/chat`; with no `history_len`,
`[chat] default_history_len` turns (chatchat's -1 is /chat/chat's alone).
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, where `code`
is chatbus's error type.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.chat import ChatService
from core.chat_input import ChatInput, stored_turns_wanted
from core.config import ChatConfig
from core.errors import UnknownModel
from core.history import StoreUnavailable
from core.hookspecs import hookimpl
from core.keys import CONFIG, SERVICE
from core.openapi import Content, ResponseModel, operation
from core.providers import (
    GenerationParams,
    Message,
    ProviderError,
    Reasoning,
    ShuttingDown,
    ToolCallDelta,
)
from core.routes import caller_of
from core.turn import ChatTurn, TurnResult
from core.validation import query_problem
from core.web import ApiError, answer_errors_as, json_response, read_body
from plugins.transports.frames import BurstWriter, stream_turn

SEPARATOR = b"\n\n"  # what OpenAI sends
DONE = b"data: [DONE]" + SEPARATOR


ROLES = ("system", "developer", "user", "assistant", "tool")
# Content parts a provider may take besides text (OpenAI's names), and the key each needs.
PART_KEYS = {"text": "text", "image_url": "image_url", "input_audio": "input_audio", "file": "file"}
# Fields chatbus cannot honour: a 400 naming each beats an answer that silently lacks it.
REFUSED = {
    "logprobs": "log probabilities are not relayed by chatbus",
    "top_logprobs": "log probabilities are not relayed by chatbus",
    "functions": "the deprecated functions API is not supported: send `tools`",
    "function_call": "the deprecated functions API is not supported: send `tool_choice`",
    "audio": "audio answers are not supported",
}


class ToolCallParam(BaseModel):
    """An assistant's earlier tool call, as the client sends it back."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: dict[str, Any]

    @field_validator("function")
    @classmethod
    def _named(cls, function: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(function.get("name"), str):
            raise ValueError("a tool call's function needs a name")
        return function


class CompletionMessage(BaseModel):
    """One message in OpenAI's shape; sent on as the client sent it (what it set, and any
    other key), but for `developer` (sent as `system`) and a list of text parts only (their
    texts, one a line)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = Field(None, validate_default=True)

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, tool_call_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not tool_call_id:
            raise ValueError("a tool message answers a call: it needs the call's id")
        return tool_call_id

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content: object) -> object:
        if not isinstance(content, list):
            return content
        for part in content:
            key = PART_KEYS.get(str(part.get("type"))) if isinstance(part, dict) else None
            if key is None or not part.get(key):
                raise ValueError(
                    "content parts are {type: text | image_url | input_audio | file} objects,"
                    " each with its own field"
                )
            if key == "image_url" and not isinstance(part["image_url"].get("url"), str):
                raise ValueError("an image_url part needs its url")
        if all(part["type"] == "text" for part in content):
            return "\n".join(str(part["text"]) for part in content)
        return content

    @model_validator(mode="after")
    def _role_fields(self) -> CompletionMessage:
        if self.content is None and not self.tool_calls:
            self.content = ""  # as a missing content has always been read
        return self

    def as_sent(self) -> Message:
        message = self.model_dump(exclude_unset=True)
        message["content"] = self.content
        if self.role == "developer":  # OpenAI's newer name; other servers know `system`
            message["role"] = "system"
        return message

    def attachments(self) -> tuple[dict[str, Any], ...]:
        """The parts besides text (images, audio, files)."""
        if not isinstance(self.content, list):
            return ()
        return tuple(part for part in self.content if part["type"] != "text")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part["text"] for part in self.content if part["type"] == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's request body: the generation parameters in `params()` (typed, or any other
    field passed through as is), chatbus's own fields, and REFUSED ones answered 400."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the configured default model
    messages: list[CompletionMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None  # one choice only: see _one_choice
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name: wins over max_tokens
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # REFUSED
    logprobs: Any = None
    top_logprobs: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    # chatbus's own fields
    conversation_id: str = ""
    history_len: int | None = None  # None: [chat] default_history_len
    prompt_name: str = "default"

    @field_validator("tools")
    @classmethod
    def _functions(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for tool in tools or ():
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict):
                raise ValueError('each tool is {"type": "function", "function": {...}}')
            if not isinstance(function.get("name"), str):
                raise ValueError("each tool's function needs a name")
        return tools

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("chatbus answers with one choice: n must be 1")
        return n

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, value: object, info: ValidationInfo) -> object:
        if value not in (None, False):
            raise ValueError(REFUSED[str(info.field_name)])
        return value

    def params(self) -> GenerationParams:
        max_tokens = (
            self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens
        )
        return GenerationParams(
            temperature=self.temperature,
            max_tokens=max_tokens if max_tokens is not None and max_tokens > 0 else None,
            top_p=self.top_p,
            stop=self.stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format,
            user=self.user,
            extra=self.model_extra or {},
        )


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
    content: str | None  # null when the answer is tool calls alone
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape: {"id", "type", "function"}
    reasoning_content: str | None = None  # the model's thinking (DeepSeek's name)
    reasoning: str | None = None  # the same (vLLM's newer name)


class Choice(ResponseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class TokenUsage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None  # cached_tokens, when known
    completion_tokens_details: dict[str, int] | None = None  # reasoning_tokens, when known


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
    router.add_get("/v1/models/{id}", get_model)
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
    return json_response({"object": "list", "data": [model_object(name) for name in names]})


@operation(
    "One configured model",
    responses={200: ModelCard},
    errors={404: "No model of that name is configured."},
    tags=["openai"],
)
async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["id"]
    if request.app[SERVICE].models.get(name) is None:
        message = f"The model '{name[:128]}' does not exist"
        return error_response(404, "model_not_found", message, "model")
    return json_response(model_object(name))


def model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatbus"}


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
    chat_input = to_chat_input(body, model, config.chat)
    async with service.start(chat_input, caller_of(request)) as turn:
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
                    "message": answer_message(result),
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": await usage_of(service, turn),
            "chatbus": ids,
        }
    )


def answer_message(result: TurnResult) -> dict[str, Any]:
    """The whole answer as OpenAI's assistant message: content null when it is only tool
    calls; the reasoning under both names clients read."""
    message: dict[str, Any] = {"role": "assistant", "content": result.text}
    if result.tool_calls:
        message["content"] = result.text or None
        message["tool_calls"] = list(result.tool_calls)
    if result.reasoning:
        message["reasoning_content"] = message["reasoning"] = result.reasoning
    return message


def to_chat_input(body: CompletionRequest, model: str, chat: ChatConfig) -> ChatInput:
    """The last message is the query (a user's), the ones before it the history; or the
    messages after the last assistant's are tool results, which the turn answers."""
    messages = body.messages
    history_len = chat.default_history_len if body.history_len is None else body.history_len
    results = trailing_tool_results(messages)
    earlier = messages[: len(messages) - (len(results) or 1)]
    history = tuple(message.as_sent() for message in earlier)
    last = messages[-1]
    query = ""
    attachments: tuple[dict[str, Any], ...] = ()
    if not results:
        if last.role != "user":
            raise invalid("messages", "the last message must be the user's (or a tool's)")
        query = last.text()
        attachments = last.attachments()
        problem = query_problem(query, chat.max_query_chars) if query or not attachments else None
        if problem is not None:  # an image alone is a query
            raise invalid(f"messages.{len(earlier)}.content", problem)
    return ChatInput(
        query=query,
        history=history,
        conversation_id=body.conversation_id,
        history_len=stored_turns_wanted(body.conversation_id, history, history_len),
        model=model,
        prompt_name=body.prompt_name,
        stream=body.stream,
        params=body.params(),
        attachments=attachments,
        tool_results=tuple(message.as_sent() for message in results),
    )


def trailing_tool_results(messages: list[CompletionMessage]) -> list[CompletionMessage]:
    """The tool messages that end the conversation (answers to the last tool calls)."""
    count = 0
    for message in reversed(messages):
        if message.role != "tool":
            break
        count += 1
    return messages[len(messages) - count :]


def invalid(param: str, problem: str) -> ApiError:
    """A request field chatbus cannot take: a 400 naming it."""
    return ApiError(400, "validation_error", f"{param}: {problem}", field=param)


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

    async def send_chunk(piece: Reasoning | ToolCallDelta) -> None:
        choice = {"index": 0, "delta": delta_of(piece), "finish_reason": None}
        await frames.send_frame(frame({**chunk, "choices": [choice]}))

    async with response:  # stops the keep-alive pings, whatever happens
        with contextlib.suppress(ConnectionResetError):  # if gone, the first delta says so
            await response.write(frame({**chunk, "choices": [{**opening, "finish_reason": None}]}))
        await stream_turn(frames, turn, ending, send_chunk)
    return response


def delta_of(piece: Reasoning | ToolCallDelta) -> dict[str, Any]:
    """A reasoning or tool-call piece as OpenAI's delta: reasoning under both names clients
    read; a call's index on every piece, its id, type and name on its first."""
    if isinstance(piece, Reasoning):
        return {"reasoning_content": piece.text, "reasoning": piece.text}
    call: dict[str, Any] = {"index": piece.index}
    function: dict[str, Any] = {"arguments": piece.arguments}
    if piece.id is not None:
        call["id"], call["type"] = piece.id, "function"
    if piece.name is not None:
        function = {"name": piece.name, **function}
    call["function"] = function
    return {"tool_calls": [call]}


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
    last = {"index": 0, "delta": {}, "finish_reason": result.finish_reason}
    finish = frame({**chunk, "choices": [last]})
    if include_usage:
        finish += frame({**chunk, "choices": [], "usage": await usage_of(service, turn)})
    return finish + DONE


def failed_status(error: ProviderError) -> int:
    return SHUTTING_DOWN_STATUS if isinstance(error, ShuttingDown) else FAILED_STATUS


def frame(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + SEPARATOR


async def usage_of(service: ChatService, turn: ChatTurn) -> dict[str, Any]:
    """The token counts stored with the turn (zeros when unknown), and the details known."""
    try:
        record = await service.store.get_message(turn.record.tenant, turn.message_id)
    except StoreUnavailable:
        record = None
    usage = record.usage if record is not None else None
    if usage is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    prompt, completion = usage.prompt_tokens or 0, usage.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **usage.details(),
    }
