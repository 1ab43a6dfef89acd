"""An example chatbus plugin, installed from outside: the `reverse` provider kind.

It answers with the words of the last user message in reverse order, streamed word by
word, then the token counts. chatbus finds it through this distribution's entry point:

    [project.entry-points.chatbus]
    example = "chatbus_provider_example"

and a config model names its kind:

    [models.backwards]
    provider = "reverse"
    upper = true        # optional: shout the answer
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from chatbus import ModelCall, ModelSpec, ProviderFactory, Usage, hookimpl

KIND = "reverse"


class ReverseOptions(BaseModel):
    """The keys of `[models.<name>]` besides `provider` (and chatbus's own `retries`,
    `retry_backoff`, `fallbacks`). `extra="forbid"`: a misspelt key stops start-up."""

    model_config = ConfigDict(extra="forbid")

    upper: bool = Field(False, description="answer in capitals")
    delay: float = Field(0.0, ge=0, le=60, description="seconds to wait before each word")


class ReverseProvider:
    def __init__(self, options: ReverseOptions) -> None:
        self.options = options

    async def stream(self, call: ModelCall) -> AsyncGenerator[str | Usage, None]:
        last = next((m["content"] for m in reversed(call.messages) if m["role"] == "user"), "")
        words = last.split()[::-1]
        if call.max_tokens is not None:
            words = words[: call.max_tokens]
        # A real provider would hold an upstream connection here, in `async with`: when the
        # client leaves, chatbus closes this generator (GeneratorExit at the `yield`), and
        # the `async with` / `finally` releases the connection at once.
        for index, word in enumerate(words):
            if self.options.delay:
                await asyncio.sleep(self.options.delay)
            if self.options.upper:
                word = word.upper()
            yield word if index == 0 else f" {word}"
        prompt = sum(len(m["content"].split()) for m in call.messages)
        yield Usage(prompt_tokens=prompt, completion_tokens=len(words))


def make_reverse(spec: ModelSpec, http: aiohttp.ClientSession) -> ReverseProvider:
    """Called once per configured model at start-up. A pydantic ValidationError (or a
    ValueError) raised here becomes a one-line configuration error naming the key."""
    return ReverseProvider(ReverseOptions.model_validate(spec.options))


@hookimpl
def register_providers(register: Callable[[str, ProviderFactory], None]) -> None:
    register(KIND, make_reverse)
