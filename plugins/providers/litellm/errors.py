"""chatbus's errors for the exceptions litellm raises."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable

import pydantic

from core.providers import (
    CONTEXT_HINTS,
    AuthenticationFailed,
    BadRequest,
    ContextWindowExceeded,
    MalformedResponse,
    ProviderError,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from plugins.providers.litellm.loading import loaded

# "litellm.RateLimitError: RateLimitError: OpenAIException - ..." -> "OpenAIException - ..."
_NAME_PREFIXES = re.compile(r"^(?:litellm\.\w+: |\w+(?:Error|Exception): )+")


# --- errors -------------------------------------------------------------------------------


def provider_error(exc: BaseException) -> ProviderError | None:
    """A chatbus error for an exception litellm raised; None if it is none of litellm's."""
    openai = sys.modules.get("openai")
    litellm = loaded()
    if litellm is None or openai is None or not isinstance(exc, openai.OpenAIError):
        return None
    e = litellm.exceptions
    text = _describe(exc)
    status = _status(exc)
    # Not in every litellm >= 1.50: where a class is missing, an empty tuple matches nothing.
    mid_stream = getattr(e, "MidStreamFallbackError", ())
    bad_gateway = getattr(e, "BadGatewayError", ())
    if isinstance(exc, mid_stream):  # a ServiceUnavailableError: first
        original = getattr(exc, "original_exception", None)
        if not isinstance(original, BaseException):
            original = None
        detail = text if original is None else _describe(original)
        if _json_error_in_chain(exc):
            return MalformedResponse(f"the upstream sent a frame that is not JSON ({detail})")
        if isinstance(original, openai.OpenAIError) and not isinstance(
            original, (mid_stream, openai.APIConnectionError)
        ):
            return provider_error(original)  # e.g. a rate limit reported mid-stream
        return UpstreamUnavailable(f"the answer broke off: {detail}")
    # Subclasses before their bases: ContextWindowExceededError is a BadRequestError, and
    # litellm.Timeout an openai.APIConnectionError.
    if isinstance(exc, e.ContextWindowExceededError):
        return ContextWindowExceeded(text)
    if isinstance(exc, e.AuthenticationError | e.PermissionDeniedError):
        return AuthenticationFailed(text)
    if isinstance(exc, e.RateLimitError):
        return _rate_limited(text, exc)
    if isinstance(exc, openai.APITimeoutError):  # litellm.Timeout included
        return UpstreamTimeout(text)
    invalid = (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError)
    if isinstance(exc, invalid):
        hint = text.lower()
        if any(h in hint for h in CONTEXT_HINTS):  # a context error litellm did not name
            return ContextWindowExceeded(text)
        return BadRequest(text)
    if isinstance(exc, openai.APIConnectionError):  # litellm.APIConnectionError included
        if _json_error_in_chain(exc):
            return MalformedResponse(f"the upstream sent a frame that is not JSON ({text})")
        return UpstreamUnavailable(text)
    if isinstance(exc, (e.ServiceUnavailableError, e.InternalServerError, bad_gateway)):
        return UpstreamUnavailable(text)
    # Any other APIError (litellm raises its plain APIError for e.g. an OpenAI 403): by status.
    if status in (401, 403):
        return AuthenticationFailed(text)
    if status == 429:
        return _rate_limited(text, exc)
    if status is not None and status >= 500:
        return UpstreamUnavailable(text)
    return ProviderError(text)


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    """`RateLimitError (429): OpenAIException - slow down`, without litellm's repetitions."""
    message = str(getattr(exc, "message", None) or exc)
    message = message.split(" Original exception: ", 1)[0]
    message = _NAME_PREFIXES.sub("", message).strip() or "no message"
    status = _status(exc)
    openai = sys.modules["openai"]
    if isinstance(exc, openai.APIConnectionError) and status in (500, 408):
        status = None  # litellm's stand-in for "no answer", not a status the upstream sent
    name = type(exc).__name__
    return f"{name} ({status}): {message}"[:500] if status else f"{name}: {message}"[:500]


def _rate_limited(text: str, exc: BaseException) -> RateLimited:
    error = RateLimited(text)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        with contextlib.suppress(Exception):  # a stand-in response may have odd headers
            error.retry_after = headers.get("retry-after")
    return error


def _json_error_in_chain(exc: BaseException) -> bool:
    """Whether the upstream sent bytes that are not JSON (or not even UTF-8)."""
    return found_in_chain(exc, lambda e: isinstance(e, json.JSONDecodeError | UnicodeDecodeError))


def is_usage_error(exc: BaseException) -> bool:
    """litellm's own validation of the upstream's token counts (a string, a float)."""
    return isinstance(exc, pydantic.ValidationError) and exc.title == "Usage"


def found_in_chain(exc: BaseException, match: Callable[[BaseException], bool]) -> bool:
    return first_in_chain(exc, match) is not None


def first_in_chain(
    exc: BaseException, match: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first exception of `exc`'s chain (causes, contexts, litellm's originals) to match."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if match(current):
            return current
        seen.add(id(current))
        following = current.__cause__ or current.__context__
        if following is None:  # MidStreamFallbackError keeps its cause as an attribute
            original = getattr(current, "original_exception", None)
            following = original if isinstance(original, BaseException) else None
        current = following
    return None
