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

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import AsyncGenerator, Iterator
from types import ModuleType
from typing import Any

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.hookspecs import hookimpl
from core.providers import (
    Chunk,
    Finish,
    MalformedResponse,
    ModelCall,
    ModelSpec,
    Reasoning,
    ToolCallDelta,
    Usage,
    key_from_env,
    redacted,
    refuse_keys_in_file,
    warn_if_key_unset,
)
from plugins.providers.litellm.errors import (
    first_in_chain,
    found_in_chain,
    is_usage_error,
    provider_error,
)
from plugins.providers.litellm.events import (
    EventTooLong,
    close_shared_session,
    event_limit,
    shared_session,
)
from plugins.providers.litellm.loading import load_litellm, loaded

log = structlog.get_logger("chatbus.litellm")
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
        litellm = loaded() or await load_litellm()
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
            limit = event_limit.set(self.options.max_event_bytes)
            try:
                response = await litellm.acompletion(**kwargs)
            finally:
                event_limit.reset(limit)
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
            too_long = first_in_chain(exc, lambda e: isinstance(e, EventTooLong))
            if too_long is not None:
                raise MalformedResponse(str(too_long)) from None
            if finished and found_in_chain(exc, is_usage_error):
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
