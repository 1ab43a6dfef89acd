"""The /v1 handlers: the models, and a chat completion, whole or streamed."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from core.chat import ChatService
from core.chat_input import ChatInput, stored_turns_wanted
from core.config import ChatConfig
from core.history import StoreUnavailable
from core.keys import CONFIG, SERVICE
from core.openapi import operation
from core.providers import (
    ProviderError,
    Reasoning,
    ShuttingDown,
    ToolCallDelta,
)
from core.routes import caller_of
from core.turn import ChatTurn, TurnResult
from core.validation import query_problem
from core.web import ApiError, json_response, read_body
from plugins.transports.frames import BurstWriter, stream_turn
from plugins.transports.openai.responses import (
    COMPLETION_CHUNKS,
    DONE,
    FAILED_STATUS,
    NO_SDK_RETRY,
    SEPARATOR,
    SHUTTING_DOWN_STATUS,
    ChatbusFailure,
    ChatCompletion,
    ModelCard,
    ModelList,
    error_body,
    error_response,
)
from plugins.transports.openai.schemas import CompletionMessage, CompletionRequest


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
