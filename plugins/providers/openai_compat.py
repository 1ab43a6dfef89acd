"""The fast native path to any OpenAI-compatible server (vLLM, Ollama, llama.cpp, FastChat,
DeepSeek, OpenAI itself): the app's one aiohttp session, SSE lines parsed with orjson,
no per-chunk objects beyond the dict orjson makes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from core.hookspecs import hookimpl
from core.providers import (
    CONTEXT_HINTS,
    AuthenticationFailed,
    BadRequest,
    ContextWindowExceeded,
    MalformedResponse,
    ModelCall,
    ModelSpec,
    ProviderError,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
    redacted,
    refuse_keys_in_file,
)

log = structlog.get_logger("chatbus.openai_compat")


class OpenAICompatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the server knows")
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(120.0, gt=0, description="longest silence, first token too")
    total_timeout: float | None = Field(None, gt=0)
    include_usage: bool = Field(True, description="ask for usage (stream_options)")
    extra_body: dict[str, Any] = Field({}, description="more request fields, e.g. top_p")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        refuse_keys_in_file(data)
        return data

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class OpenAICompatProvider:
    def __init__(self, options: OpenAICompatOptions, http: aiohttp.ClientSession) -> None:
        self.options = options
        self.url = URL(f"{options.base_url}/chat/completions")  # parsed once, not per call
        self.http = http
        self.timeout = aiohttp.ClientTimeout(
            total=options.total_timeout,
            connect=options.connect_timeout,
            sock_read=options.read_timeout,
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        name = self.options.api_key_env
        if name:
            key = os.environ.get(name)
            if not key:
                raise AuthenticationFailed(f"the environment variable {name} is not set")
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, call: ModelCall) -> bytes:
        body: dict[str, Any] = {
            **self.options.extra_body,
            "model": self.options.model,
            "messages": call.messages,
            "stream": True,
            "temperature": call.temperature,
        }
        if call.max_tokens is not None:
            body["max_tokens"] = call.max_tokens
        if self.options.include_usage:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def stream(self, call: ModelCall) -> AsyncIterator[str | Usage]:
        headers = self._headers()
        try:
            async with self.http.post(
                self.url,
                data=self._body(call),
                headers=headers,
                timeout=self.timeout,
                read_bufsize=1 << 20,
            ) as response:
                if response.status != 200:
                    raise await _status_error(response)
                finished = False
                pending = b""
                # Take whatever has arrived, not line by line: one await per network read.
                async for received in response.content.iter_any():
                    lines = (pending + received).split(b"\n")
                    pending = lines.pop()  # an incomplete last line waits for the rest
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue  # blank separators, `:` comments, `event:` lines
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            return
                        chunk = _parse(data)
                        choices = chunk.get("choices")
                        if choices:
                            choice = choices[0]
                            content = choice["delta"].get("content")
                            if content:
                                yield content
                            if choice.get("finish_reason"):
                                finished = True
                        elif "error" in chunk:
                            raise _error_from_body(0, chunk["error"])
                        usage = chunk.get("usage")
                        if usage:
                            yield Usage(usage.get("prompt_tokens"), usage.get("completion_tokens"))
                if not finished and pending[5:].strip() != b"[DONE]":
                    raise UpstreamUnavailable("the upstream ended the stream before finishing")
        except ProviderError as exc:
            raise redacted(exc, headers.get("Authorization", "").removeprefix("Bearer ")) from None
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise MalformedResponse(f"the upstream sent an unexpected chunk ({exc!r})") from None
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from {self.options.base_url} in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(
                f"cannot connect to {self.options.base_url}: {exc.os_error.strerror or exc}"
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise UpstreamUnavailable(
                f"the upstream connection broke mid-answer ({type(exc).__name__})"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream request failed: {exc}") from None


def _parse(data: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedResponse(
            f"the upstream sent a frame that is not JSON: {data[:80]!r}"
        ) from None
    if not isinstance(chunk, dict):
        raise MalformedResponse("the upstream sent a frame that is not a JSON object")
    return chunk


async def _status_error(response: aiohttp.ClientResponse) -> ProviderError:
    raw = await response.content.read(4096)
    try:
        error = orjson.loads(raw).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        error = {"message": raw.decode(errors="replace").strip()[:300]}
    if isinstance(error, str):
        error = {"message": error}
    exc = _error_from_body(response.status, error)
    if isinstance(exc, RateLimited):
        exc.retry_after = response.headers.get("Retry-After")
    return exc


def _error_from_body(status: int, error: Any) -> ProviderError:
    """Map an HTTP status and an OpenAI-shaped error object to a chatbus error type."""
    error = error if isinstance(error, dict) else {"message": str(error)}
    message = str(error.get("message") or "no message")[:500]
    where = f"the upstream answered {status}" if status else "the upstream reported an error"
    text = f"{where}: {message}"
    hint = f"{message} {error.get('code') or ''} {error.get('type') or ''}".lower()
    if status in (401, 403):
        return AuthenticationFailed(text)
    if status == 429:
        return RateLimited(text)
    if status == 504:
        return UpstreamTimeout(text)
    if status in (408, 409) or status >= 500:
        return UpstreamUnavailable(text)
    if any(h in hint for h in CONTEXT_HINTS):
        return ContextWindowExceeded(text)
    if 400 <= status < 500:
        return BadRequest(text)
    return ProviderError(text)


@hookimpl
def register_providers(register: Any) -> None:
    register("openai_compat", make_openai_compat)


def make_openai_compat(spec: ModelSpec, http: aiohttp.ClientSession) -> OpenAICompatProvider:
    options = OpenAICompatOptions.model_validate(spec.options)
    if options.api_key_env and not os.environ.get(options.api_key_env):
        log.warning("api key variable not set", model=spec.name, variable=options.api_key_env)
    return OpenAICompatProvider(options, http)
