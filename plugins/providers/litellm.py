"""Any of litellm's 100+ model APIs (OpenAI, Anthropic, Bedrock, Vertex, Azure, Gemini, ...)
through `litellm.acompletion(stream=True)`.

litellm is heavy (seconds and some hundreds of MB to import), so chatbus never imports it
unless a model with `provider = "litellm"` is configured: `open` imports it in a thread at
start-up, with `LITELLM_LOCAL_MODEL_COST_MAP=True` so that the import never reaches for the
network. litellm's own retries are off (chatbus retries before the first delta itself).

Every litellm request goes through one aiohttp session of chatbus's (litellm's
`shared_session`), whose responses refuse an event longer than the model's
`max_event_bytes`: the OpenAI SDK (and litellm's own parsers) hold an event whole, with no
limit of their own, so an upstream that never ends a line would otherwise take all memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import aiohttp
import pydantic
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.hookspecs import hookimpl
from core.providers import (
    CONTEXT_HINTS,
    AuthenticationFailed,
    BadRequest,
    Chunk,
    ContextWindowExceeded,
    Finish,
    MalformedResponse,
    ModelCall,
    ModelSpec,
    ProviderError,
    RateLimited,
    Reasoning,
    ToolCallDelta,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
    key_from_env,
    redacted,
    refuse_keys_in_file,
    warn_if_key_unset,
)

log = structlog.get_logger("chatbus.litellm")
LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
# Options that give one call litellm callbacks of its own: such a model reads streams to the end.
CALLBACK_OPTIONS = ("callbacks", "success_callback", "logger_fn")
# Keys chatbus sets on every call: refused in the file, with the reason.
RESERVED = {
    "messages": "comes with each request",
    "temperature": "comes with each request",
    "max_tokens": "comes with each request",
    "stream": "chatbus always streams",
    "stream_options": "chatbus always asks for usage",
    "num_retries": "chatbus retries itself: set `retries` on the model instead",
}
# "litellm.RateLimitError: RateLimitError: OpenAIException - ..." -> "OpenAIException - ..."
_NAME_PREFIXES = re.compile(r"^(?:litellm\.\w+: |\w+(?:Error|Exception): )+")


class LiteLLMOptions(BaseModel):
    """The model's options; any key not named here goes to `litellm.acompletion` as is
    (top_p, api_version, custom_llm_provider, mock_response, ...)."""

    model_config = ConfigDict(extra="allow", hide_input_in_errors=True)

    model: str = Field(min_length=1, description="litellm's name, e.g. openai/gpt-4o-mini")
    api_base: str | None = Field(None, description="the API's base URL, when not the default")
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    timeout: float = Field(120.0, gt=0, description="seconds: longest wait for the upstream")
    max_event_bytes: int = Field(
        1 << 20, gt=0, description="longest event (or line) of the upstream's stream"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        refuse_keys_in_file(data)
        if isinstance(data, dict):
            for key, why in RESERVED.items():
                if key in data:
                    raise ValueError(f"{key}: not an option here, {why}")
        return data

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


# --- the lazy import ----------------------------------------------------------------------

_litellm: ModuleType | None = None


async def load_litellm() -> ModuleType:
    """litellm, imported once (in a thread: the event loop keeps running) and quietened."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
        # Any: litellm sets its switches as module attributes, which a ModuleType lacks
        module: Any = await asyncio.to_thread(importlib.import_module, "litellm")
        module.suppress_debug_info = True  # no "Give Feedback / Get Help" banners
        if hasattr(module, "telemetry"):  # gone from recent versions; off in older ones
            module.telemetry = False
        if "LITELLM_LOG" not in os.environ:  # an operator who asks for its logs gets them
            for name in LITELLM_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        _litellm = module
    return _litellm


# --- the event limit ----------------------------------------------------------------------


class EventTooLong(Exception):
    """The upstream sent more than the limit's bytes without ending an event."""


# The limit of the request being made; set only while `acompletion` sends it (so in the task
# and context that open the response), never across a yield.
_event_limit: ContextVar[int | None] = ContextVar("chatbus_litellm_event_limit", default=None)
# An event ends at a blank line: "\n\n", "\r\r" or "\r\n\r\n".
_EVENT_END = re.compile(rb"\n\r?\n|\r\r")


class _EventLimitedResponse(aiohttp.ClientResponse):
    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        await super().start(connection)
        limit = _event_limit.get()
        if limit is not None:
            self.content = _EventLimitedBody(self.content, limit)  # type: ignore[assignment]
        return self


class _EventLimitedBody:
    """The response body as litellm's transport reads it (`iter_chunked`), counting the bytes
    since the last blank line; anything else is the body's own."""

    def __init__(self, body: aiohttp.StreamReader, limit: int) -> None:
        self._body = body
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._body, name)

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        return self._counted(self._body.iter_chunked(n))

    def iter_any(self) -> AsyncIterator[bytes]:
        return self._counted(self._body.iter_any())

    async def _counted(self, reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        run = 0  # bytes of the event not ended yet
        tail = b""  # the last bytes read, for an end split between two reads
        async for chunk in reads:
            seen = tail + chunk
            events = _EVENT_END.split(seen)
            longest = max(run - len(tail), 0) + len(events[0])  # the event under way
            if len(events) > 2:
                longest = max(longest, *map(len, events[1:-1]))
            if longest > self._limit:
                raise EventTooLong(f"the upstream sent an event longer than {self._limit} bytes")
            run = longest if len(events) == 1 else len(events[-1])
            tail = seen[-2:]
            yield chunk


_session: aiohttp.ClientSession | None = None
_session_loop: asyncio.AbstractEventLoop | None = None


def shared_session() -> aiohttp.ClientSession:
    """chatbus's session for litellm, made in the running loop. litellm caches its clients
    whatever the session, so a new session (a new loop, after a close) forgets them."""
    global _session, _session_loop
    loop = asyncio.get_running_loop()
    if _session is None or _session.closed or _session_loop is not loop:
        _forget_litellm_clients()
        _session_loop = loop
        _session = aiohttp.ClientSession(
            response_class=_EventLimitedResponse,
            cookie_jar=aiohttp.DummyCookieJar(),  # one upstream's cookies are not another's
        )
    return _session


def _forget_litellm_clients() -> None:
    cache = getattr(_litellm, "in_memory_llm_clients_cache", None)
    if cache is not None:
        cache.flush_cache()


async def close_shared_session() -> None:
    """Close litellm's cached clients, then the session under them."""
    global _session
    close = getattr(_litellm, "close_litellm_async_clients", None)
    if close is not None:
        try:
            await close()
        except Exception:  # best effort at shut-down
            log.warning("closing litellm's clients failed", exc_info=True)
    _forget_litellm_clients()
    if _session is not None:
        session, _session = _session, None
        await session.close()


# --- the provider -------------------------------------------------------------------------


class LiteLLMProvider:
    def __init__(self, options: LiteLLMOptions) -> None:
        self.options = options
        # Everything but the messages, the caller's parameters and the key: built once.
        fixed: dict[str, Any] = {
            **options.extra,
            "model": options.model,
            "stream": True,
            "timeout": options.timeout,
            "num_retries": 0,
        }
        if options.api_base is not None:
            fixed["api_base"] = options.api_base
        self._fixed = fixed
        self._callbacks = any(name in options.extra for name in CALLBACK_OPTIONS)

    async def open(self) -> None:
        litellm = await load_litellm()
        for option, meant in unknown_options(litellm, self.options).items():
            if meant:
                log.warning(
                    "litellm does not know this option: it is sent as is",
                    option=option,
                    did_you_mean=meant,
                )
            else:  # most likely one provider's own (vertex_project, top_k, ...)
                log.info("an option litellm does not list: it is sent as is", option=option)

    async def aclose(self) -> None:
        """Close the HTTP clients every litellm model shares."""
        await close_shared_session()

    def _key(self) -> str | None:
        # None: litellm's own conventions apply (OPENAI_API_KEY, AWS_*, ...)
        return key_from_env(self.options.api_key_env)

    async def stream(self, call: ModelCall) -> AsyncGenerator[Chunk, None]:
        litellm = _litellm or await load_litellm()
        key = self._key()
        kwargs = {
            **self._fixed,
            **call.given(),  # absent means absent: the upstream's defaults apply
            "messages": call.messages,
            "stream_options": {"include_usage": True},  # a fresh one: litellm may edit it
            "shared_session": shared_session(),
        }
        if key is not None:
            kwargs["api_key"] = key
        # litellm sends the usage in a chunk of its own once the upstream's answer is over;
        # asked for one more chunk, it assembles the whole answer a second time (in a thread)
        # and runs its success logging, which chatbus's own events replace. So the answer ends
        # at the usage, unless some litellm success callback is there to be fed.
        to_the_end = self._callbacks or _callbacks_configured(litellm)
        response = None
        usage = None
        finished = False
        said = False
        try:
            limit = _event_limit.set(self.options.max_event_bytes)
            try:
                response = await litellm.acompletion(**kwargs)
            finally:
                _event_limit.reset(limit)
            async for chunk in response:
                choices = chunk.choices
                if choices:
                    choice = choices[0]
                    delta = choice.delta
                    content = delta.content
                    if content:
                        said = True
                        yield content
                    # A stream of tool calls (or reasoning) and no text is an answer too.
                    for piece in _beside_text(delta):
                        said = True
                        yield piece
                    if choice.finish_reason:
                        finished = True
                        yield Finish(str(choice.finish_reason))
                found = getattr(chunk, "usage", None)
                if found is not None:
                    usage = found
                    if not choices and not to_the_end:
                        break
        except Exception as exc:
            too_long = _first_in_chain(exc, lambda e: isinstance(e, EventTooLong))
            if too_long is not None:
                raise MalformedResponse(str(too_long)) from None
            if finished and _found_in_chain(exc, _is_usage_error):
                # litellm refused the counts after the answer finished: the answer stands.
                log.warning("invalid usage dropped", error=type(exc).__name__)
                return
            error = provider_error(exc)
            if error is None:
                raise  # not litellm's: a bug, which the chat service logs whole
            raise redacted(error, key) from None
        finally:
            if response is not None:
                # Closes the upstream response, so its connection is released at once when
                # the client went away or the answer ended at its usage (litellm closes it
                # itself when read to the end, or on an error).
                await response.aclose()
        if not said and usage is None:
            # The OpenAI SDK skips whatever is not an event (an HTML page, a JSON body), and
            # litellm then makes up a finish: an answer of nothing at all, with no count.
            raise MalformedResponse(
                "the upstream's answer held no event: is it an OpenAI-compatible API?"
            )
        counts = Usage.of(usage)
        if counts is not None:
            yield _without_made_up_details(counts)


def _without_made_up_details(usage: Usage) -> Usage:
    """litellm reports every detail, 0 when the upstream said nothing of it: a 0 is unknown."""
    return dataclasses.replace(
        usage,
        cached_tokens=usage.cached_tokens or None,
        reasoning_tokens=usage.reasoning_tokens or None,
    )


def _beside_text(delta: Any) -> Iterator[Reasoning | ToolCallDelta]:
    """A litellm delta's reasoning (`reasoning_content`, litellm's name for every
    provider's) and tool-call pieces."""
    reasoning = getattr(delta, "reasoning_content", None)
    if isinstance(reasoning, str) and reasoning:
        yield Reasoning(reasoning)
    for call in getattr(delta, "tool_calls", None) or ():
        function = getattr(call, "function", None)
        index = getattr(call, "index", 0)
        name = getattr(function, "name", None)
        arguments = getattr(function, "arguments", None)
        if type(index) is not int or index < 0:
            raise MalformedResponse("the upstream sent a tool call without a valid index")
        yield ToolCallDelta(
            index,
            getattr(call, "id", None) or None,
            name if isinstance(name, str) and name else None,
            arguments if isinstance(arguments, str) else "",
        )


def unknown_options(litellm: ModuleType, options: LiteLLMOptions) -> dict[str, str | None]:
    """The options (beyond chatbus's own) that litellm names nowhere (not in `acompletion`'s
    signature nor its lists of parameters), each with the close name it may mean: a
    misspelt `api_bse` would otherwise send the request to OpenAI's default URL."""
    known = set(LiteLLMOptions.model_fields)
    for function in (litellm.acompletion, getattr(litellm, "get_optional_params", None)):
        if function is not None:
            known |= set(inspect.signature(function).parameters)
    utils = sys.modules.get("litellm.types.utils")
    for listed in (
        getattr(utils, "all_litellm_params", ()),
        getattr(litellm, "OPENAI_CHAT_COMPLETION_PARAMS", ()),
    ):
        known |= set(listed)
    return {
        option: next(iter(difflib.get_close_matches(option, known, n=1, cutoff=0.85)), None)
        for option in options.extra
        if option not in known
    }


def _callbacks_configured(litellm: ModuleType) -> bool:
    """Whether litellm has success callbacks to run (a plugin may have set some)."""
    return bool(
        getattr(litellm, "callbacks", None)
        or getattr(litellm, "success_callback", None)
        or getattr(litellm, "_async_success_callback", None)
    )


# --- errors -------------------------------------------------------------------------------


def provider_error(exc: BaseException) -> ProviderError | None:
    """A chatbus error for an exception litellm raised; None if it is none of litellm's."""
    openai = sys.modules.get("openai")
    if _litellm is None or openai is None or not isinstance(exc, openai.OpenAIError):
        return None
    e = _litellm.exceptions
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
    return _found_in_chain(exc, lambda e: isinstance(e, json.JSONDecodeError | UnicodeDecodeError))


def _is_usage_error(exc: BaseException) -> bool:
    """litellm's own validation of the upstream's token counts (a string, a float)."""
    return isinstance(exc, pydantic.ValidationError) and exc.title == "Usage"


def _found_in_chain(exc: BaseException, match: Callable[[BaseException], bool]) -> bool:
    return _first_in_chain(exc, match) is not None


def _first_in_chain(
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


# --- registration -------------------------------------------------------------------------


@hookimpl
def register_providers(register: Any) -> None:
    register("litellm", make_litellm)


def make_litellm(spec: ModelSpec, http: aiohttp.ClientSession | None = None) -> LiteLLMProvider:
    """litellm has HTTP clients of its own: the app's session is not used."""
    options = LiteLLMOptions.model_validate(spec.options)
    if importlib.util.find_spec("litellm") is None:  # looked for, not imported
        raise ValueError(
            "provider litellm needs the litellm package, not installed here:"
            " .venv/bin/pip install -e '.[litellm]'"
        )
    warn_if_key_unset(spec.name, options.api_key_env)
    return LiteLLMProvider(options)
