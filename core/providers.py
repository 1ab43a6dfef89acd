"""What a model provider is, the errors it raises, and the registry of configured models.

A provider turns one `ModelCall` into an async iterator of chunks: text deltas as `str`
(the fast path), and `Reasoning`, `ToolCallDelta`, `Finish` and `Usage` (usually last).
Chunks never go through pluggy: they flow straight to the transport.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp
import structlog

log = structlog.get_logger("chatbus.providers")

# One message in OpenAI's shape: `role`, `content` (a string, a list of content parts, or
# None), and for some roles `name`, `tool_calls` (an assistant's) or `tool_call_id` (a tool's).
Message = dict[str, Any]
# Words by which upstreams say a prompt is too long, when they give no better sign.
CONTEXT_HINTS = ("context_length", "context length", "maximum context", "too many tokens")
# No real count comes near it, and the total of two counts stays an exact integer in
# JSON readers that use doubles (JavaScript's 2**53).
MAX_TOKEN_COUNT = 2**52
COUNTS = ("prompt_tokens", "completion_tokens")
DETAILS = ("cached_tokens", "reasoning_tokens")  # kept only when an upstream reports them
# Where OpenAI's usage holds each detail: {"prompt_tokens_details": {"cached_tokens": ...}}
DETAIL_HOMES = {
    "cached_tokens": "prompt_tokens_details",
    "reasoning_tokens": "completion_tokens_details",
}


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts. Each is a non-negative int below MAX_TOKEN_COUNT or None: anything else
    (a bool, a float, a string, a negative or huge number) is dropped, with one log line,
    whoever built the Usage, so no transport or store ever adds up a string.
    `cached_tokens` (of the prompt) and `reasoning_tokens` (of the completion) are details."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None

    def __post_init__(self) -> None:
        dropped = {}
        for name in (*COUNTS, *DETAILS):
            value = getattr(self, name)
            if value is not None and not _is_count(value):
                dropped[name] = type(value).__name__  # the type only: no payload in logs
                object.__setattr__(self, name, None)
        if dropped:
            log.warning("invalid token counts dropped", dropped=dropped)

    def counts(self) -> dict[str, int | None]:
        """As OpenAI names them: what stores keep and clients read. A detail is there only
        when known."""
        counts = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        for name in DETAILS:
            value = getattr(self, name)
            if value is not None:
                counts[name] = value
        return counts

    def details(self) -> dict[str, dict[str, int]]:
        """The known details in OpenAI's shape: `{"prompt_tokens_details": {...}, ...}`."""
        found: dict[str, dict[str, int]] = {}
        for name in DETAILS:
            value = getattr(self, name)
            if value is not None:
                found[DETAIL_HOMES[name]] = {name: value}
        return found

    @classmethod
    def of(cls, found: object) -> Usage | None:
        """The usage an upstream reported: a mapping (OpenAI's JSON) or an object with
        attributes (litellm's); None when it holds no valid count."""
        if found is None:
            return None
        if isinstance(found, Mapping):
            counts = [found.get(name) for name in COUNTS]
            details = [_detail(found.get(DETAIL_HOMES[name]), name) for name in DETAILS]
        elif any(hasattr(found, name) for name in COUNTS):
            counts = [getattr(found, name, None) for name in COUNTS]
            homes = (getattr(found, DETAIL_HOMES[name], None) for name in DETAILS)
            details = [_detail(home, name) for home, name in zip(homes, DETAILS, strict=True)]
        else:  # a string, a number, a list: not a usage at all
            log.warning("invalid usage dropped", kind=type(found).__name__)
            return None
        usage = cls(*counts, *details)
        if usage.prompt_tokens is None and usage.completion_tokens is None:
            return None
        return usage


def _detail(home: object, name: str) -> object:
    """One detail from its home (a mapping or an object), or None."""
    if home is None:
        return None
    if isinstance(home, Mapping):
        return home.get(name)
    return getattr(home, name, None)


def message_text(message: Message) -> str:
    """A message's text: its content when a string, its text parts joined when a list of
    parts; "" when it has none (an assistant's tool calls)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return "\n".join(text for text in texts if isinstance(text, str))
    return ""


def _is_count(value: object) -> bool:
    return type(value) is int and 0 <= value < MAX_TOKEN_COUNT  # bool is not an int here


@dataclass(frozen=True, slots=True)
class Reasoning:
    """A piece of the model's reasoning (thinking), streamed beside the answer's text: never
    part of it."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call the model makes, as OpenAI streams it: `index` on every piece
    (calls of one answer have different ones), `id` and `name` on a call's first piece, and
    `arguments` (JSON text) in pieces to be joined per index."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Finish:
    """Why the model stopped, as the upstream said: `stop`, `length`, `tool_calls`,
    `content_filter`, ... (a provider yields it once, at the end; none: `stop`, or
    `tool_calls` when the answer made some)."""

    reason: str


# What a provider yields: text (a plain `str`, the fast path), and the typed chunks.
Chunk = str | Reasoning | ToolCallDelta | Finish | Usage


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationParams:
    """The caller's generation parameters: a typed core of the common ones (None: not
    given, so not sent: the upstream's own default applies) and the rest as given."""

    temperature: float | None = None
    max_tokens: int | None = None  # None: the model's own limit
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # any other field, passed through

    def given(self) -> dict[str, Any]:
        """The parameters given, by OpenAI's names: the typed ones, then the rest."""
        given = {name: value for name in TYPED_PARAMS if (value := getattr(self, name)) is not None}
        if self.extra:
            given.update(self.extra)
        return given


PARAM_FIELDS = tuple(GenerationParams.__dataclass_fields__)
TYPED_PARAMS = tuple(name for name in PARAM_FIELDS if name != "extra")


@dataclass(frozen=True, slots=True)
class ModelCall(GenerationParams):
    """What a provider is asked: the messages in OpenAI's shape, and the caller's generation
    parameters (its fields, keyword-only: `ModelCall(messages, max_tokens=50)`)."""

    messages: list[Message]

    @classmethod
    def of(cls, messages: list[Message], params: GenerationParams) -> ModelCall:
        # Only what was given: the rest keep their defaults (None).
        given = {
            name: value for name in TYPED_PARAMS if (value := getattr(params, name)) is not None
        }
        if params.extra:
            given["extra"] = params.extra
        return cls(messages, **given)


@runtime_checkable
class Provider(Protocol):
    """Required: `stream`, an async generator (a turn closes it when it ends early).
    Optional: `async def open(self)`, awaited once at start-up (load a heavy library there),
    and `async def aclose(self)`, awaited at shut-down."""

    def stream(self, call: ModelCall) -> AsyncGenerator[Chunk, None]: ...


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A configured model as a provider factory sees it."""

    name: str
    provider: str
    options: dict[str, Any] = field(default_factory=dict)


# A factory builds a provider for one configured model; it may share the app's HTTP session.
ProviderFactory = Callable[[ModelSpec, aiohttp.ClientSession], Provider]


class ProviderError(Exception):
    """An upstream failure, in a type a client can act on. `type` goes on the wire."""

    type = "upstream_error"
    retryable = False


class UpstreamUnavailable(ProviderError):
    type = "upstream_unavailable"  # could not connect, 5xx, or the connection broke
    retryable = True


class UpstreamTimeout(ProviderError):
    type = "upstream_timeout"
    retryable = True


class RateLimited(ProviderError):
    type = "rate_limited"
    retryable = True
    retry_after: str | None = None  # the upstream's Retry-After, when it sent one


class AuthenticationFailed(ProviderError):
    type = "authentication_failed"


class BadRequest(ProviderError):
    type = "bad_request"


class ContextWindowExceeded(BadRequest):
    type = "context_window_exceeded"


class MalformedResponse(ProviderError):
    type = "malformed_response"


class AnswerTooLong(ProviderError):
    """The answer passed its size limit (`max_answer_chars`): what came before it is kept."""

    type = "answer_too_long"


class AnswerTimeout(UpstreamTimeout):
    """The answer passed its duration limit (`answer_timeout_seconds`), retries included:
    nothing is tried after it."""

    retryable = False


class ShuttingDown(ProviderError):
    """chatbus is shutting down and the grace ran out before the answer did: it is cut short
    (what came before is kept) and the turn is stored `cancelled`."""

    type = "shutting_down"


def key_from_env(variable: str | None) -> str | None:
    """The key held by the environment variable a model's `api_key_env` names (read at each
    call, so a rotated key is used at once). None when the model names none, or the
    variable is unset or empty: the call then goes without a key (a local server needs
    none), and start-up has said so (`warn_if_key_unset`)."""
    if not variable:
        return None
    return os.environ.get(variable) or None


def warn_if_key_unset(model: str, variable: str | None) -> None:
    """At start-up: say so once when a model's key variable is not set."""
    if variable and not os.environ.get(variable):
        log.warning("api key variable not set: the model is called without a key",
                    model=model, variable=variable)  # fmt: skip


def refuse_keys_in_file(options: object) -> None:
    """For a provider's options validator: a key written in the config file is refused."""
    if isinstance(options, dict) and "api_key" in options:
        raise ValueError(
            "api_key: keys never go in the file; name an environment variable in api_key_env"
            " instead"
        )


def redacted(error: ProviderError, key: str | None) -> ProviderError:
    """Never let an upstream's echo of our key reach a client or a log line."""
    if key:
        error.args = tuple(str(arg).replace(key, "[redacted]") for arg in error.args)
    return error
