"""The fast native path to any OpenAI-compatible server (vLLM, Ollama, llama.cpp, FastChat,
DeepSeek, OpenAI itself): the app's one aiohttp session, SSE lines parsed with orjson,
no per-chunk objects beyond the dict orjson makes."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator
from yarl import URL

from core.config import HttpUrlText
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

log = structlog.get_logger("chatbus.openai_compat")
EVENT_STREAM = "text/event-stream"
# What the other lines of an event stream begin with (`\r`: a blank line ended by CRLF).
OTHER_SSE_LINES = (b":", b"event:", b"id:", b"retry:", b"\r")
NO_DELTA: dict[str, Any] = {}  # read only


class OpenAICompatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    base_url: HttpUrlText = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the server knows")
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(120.0, gt=0, description="longest silence, first token too")
    total_timeout: float | None = Field(None, gt=0)
    include_usage: bool = Field(True, description="ask for usage (stream_options)")
    extra_body: dict[str, Any] = Field({}, description="more request fields, e.g. top_p")
    max_line_bytes: int = Field(
        1 << 20, gt=0, description="longest line of the stream, or unstreamed JSON answer"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        refuse_keys_in_file(data)
        return data


class OpenAICompatProvider:
    def __init__(self, options: OpenAICompatOptions, http: aiohttp.ClientSession) -> None:
        self.options = options
        self.url = URL(f"{options.base_url.rstrip('/')}/chat/completions")  # parsed once
        # The upstream as errors name it: without the user and password a URL may carry.
        self.where = str(URL(options.base_url).with_user(None))
        self.http = http
        self.timeout = aiohttp.ClientTimeout(
            total=options.total_timeout,
            connect=options.connect_timeout,
            sock_read=options.read_timeout,
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = key_from_env(self.options.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _body(self, call: ModelCall) -> bytes:
        body: dict[str, Any] = {
            **self.options.extra_body,
            **call.given(),  # absent means absent: the upstream's defaults apply
            "model": self.options.model,
            "messages": call.messages,
            "stream": True,
        }
        if self.options.include_usage:
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def stream(self, call: ModelCall) -> AsyncGenerator[Chunk, None]:
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
                max_line = self.options.max_line_bytes
                reads, unstreamed = await _body_of(response)
                if unstreamed:
                    for item in _completion(await _whole(reads, max_line)):
                        yield item
                    return
                finished = False
                pending = b""
                # Take whatever has arrived, not line by line: one await per network read.
                async for received in reads:
                    buffer = pending + received
                    lines = buffer.split(b"\n")
                    pending = lines.pop()  # an incomplete last line waits for the rest
                    if len(buffer) > max_line:  # only then can a line be too long
                        _check_lengths(lines, pending, max_line)
                    for line in lines:
                        if not line.startswith(b"data:"):
                            # blank separators, `:` comments, `event:` lines; not HTML
                            if line and not line.startswith(OTHER_SSE_LINES):
                                raise _not_an_event_stream(line)
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            return
                        chunk = _parse(data)
                        choices = chunk.get("choices")
                        if choices:
                            choice = choices[0]
                            delta = choice.get("delta") or NO_DELTA  # some send none at the end
                            content = delta.get("content")
                            if content:
                                yield content
                            if content is None or len(delta) > 1:  # a role, reasoning, calls
                                for piece in _beside_text(delta):
                                    yield piece
                            reason = choice.get("finish_reason")
                            if reason:
                                finished = True
                                yield Finish(str(reason))
                        elif "error" in chunk:
                            raise _error_from_body(0, chunk["error"])
                        usage = chunk.get("usage")
                        if usage:
                            found = Usage.of(usage)
                            if found is not None:
                                yield found
                if not finished:
                    _check_last_line(pending)
        except ProviderError as exc:
            raise redacted(exc, headers.get("Authorization", "").removeprefix("Bearer ")) from None
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise MalformedResponse(f"the upstream sent an unexpected chunk ({exc!r})") from None
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from {self.where} in time") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailable(
                f"cannot connect to {self.where}: {exc.os_error.strerror or exc}"
            ) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            raise UpstreamUnavailable(
                f"the upstream connection broke mid-answer ({type(exc).__name__})"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream request failed: {exc}") from None


async def _body_of(response: aiohttp.ClientResponse) -> tuple[AsyncIterator[bytes], bool]:
    """The reads of a 200 answer, and whether it is one JSON answer (an upstream that does
    not stream) rather than the event stream asked for: by its Content-Type, or, when that
    names neither, by its first bytes. Neither (an HTML page, random bytes) is malformed."""
    reads = response.content.iter_any()
    kind = response.content_type  # application/octet-stream when the header is missing
    if kind == EVENT_STREAM:
        return reads, False
    if kind == "application/json" or kind.endswith("+json"):
        return reads, True
    first = await response.content.readany()
    start = first.lstrip()
    if start.startswith(b"{"):
        unstreamed = True
    elif not start or start.startswith((b"data:", *OTHER_SSE_LINES)):
        unstreamed = False
    else:
        raise _not_an_event_stream(start, kind)
    return _after(first, reads), unstreamed


async def _after(first: bytes, reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for received in reads:
        yield received


async def _whole(reads: AsyncIterator[bytes], limit: int) -> bytes:
    body = bytearray()
    async for received in reads:
        body += received
        if len(body) > limit:
            raise MalformedResponse(f"the upstream sent a JSON answer longer than {limit} bytes")
    return bytes(body)


def _completion(body: bytes) -> list[Chunk]:
    """The chunks of one unstreamed answer (a `chat.completion`): a whole answer."""
    answer = _parse(body)
    if "error" in answer and not answer.get("choices"):
        raise _error_from_body(0, answer["error"])
    choice = answer["choices"][0]
    message = choice.get("message") or NO_DELTA
    chunks: list[Chunk] = list(_beside_text(message, numbered=True))
    if message.get("content"):
        chunks.append(message["content"])
    if choice.get("finish_reason"):
        chunks.append(Finish(str(choice["finish_reason"])))
    usage = Usage.of(answer.get("usage"))
    if usage is not None:
        chunks.append(usage)
    return chunks


def _beside_text(delta: dict[str, Any], numbered: bool = False) -> Iterator[Chunk]:
    """A delta's (or a whole message's) reasoning and tool calls. Reasoning comes as
    `reasoning_content` (DeepSeek, vLLM before its rename) or `reasoning` (vLLM now); a
    whole message's calls carry no index: their position is theirs (`numbered`)."""
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning:
        yield Reasoning(_text(reasoning, "reasoning"))
    for position, call in enumerate(delta.get("tool_calls") or ()):
        yield _tool_call(call, position if numbered else None)


def _tool_call(call: dict[str, Any], position: int | None) -> ToolCallDelta:
    index = call.get("index", position) if position is None else position
    if type(index) is not int or index < 0:
        raise MalformedResponse("the upstream sent a tool call without a valid index")
    function = call.get("function") or NO_DELTA
    return ToolCallDelta(
        index,
        _text(call.get("id"), "tool call id") or None,
        _text(function.get("name"), "tool name") or None,
        _text(function.get("arguments"), "tool arguments"),
    )


def _text(value: object, what: str) -> str:
    """A string field of the upstream's answer; None is ""; anything else is malformed."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedResponse(f"the upstream sent a {what} that is not a string")
    return value


def _check_lengths(lines: list[bytes], pending: bytes, limit: int) -> None:
    """A line that never ends (or a huge one) is refused before it takes the memory."""
    if len(pending) > limit or any(len(line) > limit for line in lines):
        raise MalformedResponse(f"the upstream sent a line longer than {limit} bytes")


def _check_last_line(pending: bytes) -> None:
    """A stream that ended without a finish reason: well if its last line (with no newline
    after it) is [DONE]; else malformed if that line is no event stream's, else broken off."""
    if pending.startswith(b"data:") and pending[5:].strip() == b"[DONE]":
        return
    if pending.strip() and not pending.startswith((b"data:", *OTHER_SSE_LINES)):
        raise _not_an_event_stream(pending)
    raise UpstreamUnavailable("the upstream ended the stream before finishing")


def _not_an_event_stream(line: bytes, kind: str = EVENT_STREAM) -> MalformedResponse:
    return MalformedResponse(
        f"the upstream answered 200 with a body that is not an event stream ({kind}): {line[:80]!r}"
    )


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
    warn_if_key_unset(spec.name, options.api_key_env)
    return OpenAICompatProvider(options, http)
