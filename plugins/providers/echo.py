"""The offline model: answers with the last user message exactly as the model received it,
in word-sized deltas. Deterministic, needs no key: the default on a fresh machine."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from core.hookspecs import hookimpl
from core.providers import Chunk, ModelCall, ModelSpec, Usage, message_text

WORDS = re.compile(r"\s*\S+\s*|\s+")  # every character lands in exactly one piece


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delay: float = Field(0.0, ge=0, description="seconds to wait before each word")


class EchoProvider:
    def __init__(self, options: EchoOptions) -> None:
        self.delay = options.delay

    async def stream(self, call: ModelCall) -> AsyncGenerator[Chunk, None]:
        users = (m for m in reversed(call.messages) if m["role"] == "user")
        last = next((message_text(m) for m in users), "")
        words = WORDS.findall(last)
        if call.max_tokens is not None:
            words = words[: call.max_tokens]
        for word in words:
            if self.delay:
                await asyncio.sleep(self.delay)
            yield word
        prompt = sum(len(WORDS.findall(message_text(m))) for m in call.messages)
        yield Usage(prompt_tokens=prompt, completion_tokens=len(words))


@hookimpl
def register_providers(register: Any) -> None:
    register("echo", make_echo)


def make_echo(spec: ModelSpec, http: aiohttp.ClientSession) -> EchoProvider:
    return EchoProvider(EchoOptions.model_validate(spec.options))
