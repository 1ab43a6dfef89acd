"""What a model provider is, the errors it raises, and the registry of configured models.

A provider turns one `ModelCall` into an async iterator of text deltas. It may yield one
`Usage` (usually last). Deltas never go through pluggy: they flow straight to the transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp

Message = dict[str, str]  # {"role": ..., "content": ...}, the OpenAI shape
# Words by which upstreams say a prompt is too long, when they give no better sign.
CONTEXT_HINTS = ("context_length", "context length", "maximum context", "too many tokens")


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ModelCall:
    messages: list[Message]
    temperature: float = 0.7
    max_tokens: int | None = None  # None: the model's own limit


@runtime_checkable
class Provider(Protocol):
    """Required: `stream`. Optional: `async def open(self)`, awaited once at start-up (load a
    heavy library there), and `async def aclose(self)`, awaited at shut-down."""

    def stream(self, call: ModelCall) -> AsyncIterator[str | Usage]: ...


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
