"""What /v1 answers, as OpenAI's clients read it: the response models (for
/openapi.json) and the error bodies."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web

from core.openapi import Content, ResponseModel
from core.web import json_response

SEPARATOR = b"\n\n"  # what OpenAI sends
DONE = b"data: [DONE]" + SEPARATOR


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
