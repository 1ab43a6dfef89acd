"""A real, in-process fake of an OpenAI-compatible chat completions upstream.

Used by the test suite and by the benchmark: it listens on a real TCP port, streams
Server-Sent Events exactly the way OpenAI does, and can be told to be slow, fail, or break
mid-stream. Mutate ``FakeUpstream.behaviour`` to change what the next requests get.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Awaitable, Callable
from copy import copy
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

__all__ = ["DEFAULT_TOKENS", "Behaviour", "FakeUpstream", "Received"]

DEFAULT_TOKENS: tuple[str, ...] = ("Hello", " from", " fake", " upstream")
MODEL_ID = "fake-model"

_DONE = b"data: [DONE]\n\n"
_MALFORMED = b"data: {not json\n\n"
_PIECE_SUFFIX = b'},"finish_reason":null}]}\n\n'
_WORD = re.compile(r"\s*\S+")
_ids = itertools.count(1)
Write = Callable[[bytes], Awaitable[None]]

# status -> (OpenAI error "type", "code")
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


@dataclass
class Behaviour:
    """What the next chat completion requests get; tests mutate ``upstream.behaviour``.

    The ``*_after`` faults are checked before piece N is sent (N may equal the piece count).
    Without streaming, ``break_after`` aborts instead of answering, and ``malformed_after`` /
    ``error_event_after`` replace the whole JSON body.
    """

    tokens: list[str] | None = None
    """Pieces to stream; None means DEFAULT_TOKENS, or the last user message if ``echo``."""
    token_count: int | None = None
    """Stream this many pieces ``"tok0 "``, ``"tok1 "``, ... (bench mode; beats ``tokens``)."""
    delay: float = 0.0
    """Seconds to pause before every piece after the first, and before the final chunk."""
    first_delay: float = 0.0
    """Seconds to wait before the response headers are sent."""
    fail_status: int | None = None
    """Answer with this HTTP status and an OpenAI-shaped JSON error body."""
    fail_message: str = "fake failure"
    fail_times: int | None = None
    """With ``fail_status``: fail only this many requests (counted down), then answer."""
    retry_after: str | None = None
    """``Retry-After`` header sent along with ``fail_status``."""
    break_after: int | None = None
    """Abort the TCP connection after this many pieces (no final chunk, no [DONE])."""
    malformed_after: int | None = None
    """Inject a ``data: {not json`` frame after this many pieces, then carry on."""
    error_event_after: int | None = None
    """Send ``data: {"error": ...}`` then ``[DONE]`` after this many pieces (vLLM style)."""
    usage: bool = True
    """Report usage (streaming: only if the request asks ``stream_options.include_usage``)."""
    echo: bool = False
    """Stream back the last user message, split into word-sized pieces."""
    one_write: bool = False
    """Streaming: send every frame, [DONE] included, in one write (a burst, as a fast
    server's deltas queued behind a stall arrive)."""
    endless: bool = False
    """Stream the pieces over and over, never finishing (no final chunk, no [DONE]): as fast
    as the client reads (big ones with ``tokens=["x" * 100_000]``), or one every ``delay``."""
    long_line: int | None = None
    """Streaming: after the first piece, a ``data:`` line of this many bytes that never ends
    (no newline), then the end of the response."""
    raw_body: bytes | None = None
    """Answer 200 with exactly these bytes (an HTML page, random bytes) as ``raw_type``."""
    raw_type: str | None = "text/html"
    """The Content-Type of ``raw_body``; None: aiohttp's default, application/octet-stream
    (what an aiohttp client also reads a missing Content-Type as)."""
    unstreamed: bool = False
    """Answer with one ``chat.completion`` JSON body even when the request asks to stream."""
    usage_values: dict[str, Any] | None = None
    """Report these usage fields as they are (``"x"``, -1, 1e25, True), streamed or not."""
    reasoning: list[str] | None = None
    """Reasoning pieces, sent before the text as ``reasoning_field`` (streamed: one delta
    each; unstreamed: joined, in the message)."""
    reasoning_field: str = "reasoning_content"
    """``reasoning_content`` (DeepSeek, vLLM before its rename) or ``reasoning`` (vLLM now)."""
    tool_calls: list[dict[str, str]] | None = None
    """Calls ``{"name", "arguments"}`` the answer makes, after its text, with finish reason
    ``tool_calls``; streamed as OpenAI does: index on every delta, id, type and name on the
    first, the arguments in pieces of ``argument_piece`` characters."""
    argument_piece: int = 4
    finish_reason: str | None = None
    """The finish reason to send (``length``, ``content_filter``); None: as the answer says."""
    no_delta: bool = False
    """Streaming: the last chunk (the finish) has no ``delta`` at all."""


@dataclass
class Received:
    """One request seen on ``/v1/chat/completions``."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


def _text(content: Any) -> str:
    """Plain text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def _pieces(b: Behaviour, body: dict[str, Any]) -> tuple[list[str], str]:
    """The pieces to send for this request and the finish reason, honouring max_tokens."""
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        limit = None
    if b.token_count is not None:
        total = b.token_count
        n = total if limit is None else min(total, limit)
        pieces = [f"tok{i} " for i in range(n)]
        return pieces, "length" if n < total else "stop"
    if b.tokens is not None:
        pieces = list(b.tokens)
    elif b.echo:
        last = next(
            (_text(m.get("content")) for m in reversed(_messages(body)) if m.get("role") == "user"),
            "",
        )
        pieces = _WORD.findall(last)
    else:
        pieces = list(DEFAULT_TOKENS)
    if limit is not None and len(pieces) > limit:
        return pieces[:limit], "length"
    return pieces, "stop"


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(_text(m.get("content")).split()) for m in _messages(body))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _usage_of(b: Behaviour, body: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
    if b.usage_values is not None:
        return dict(b.usage_values)
    return _usage(body, completion_tokens)


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind, code = _ERROR_KINDS.get(
        status, ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error_event(message: str) -> dict[str, Any]:
    """The error object vLLM and friends send in place of a chunk."""
    return {"error": {"message": message, "type": "server_error", "code": 500}}


def _error_response(status: int, message: str, retry_after: str | None = None) -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return web.Response(
        status=status,
        body=orjson.dumps(_error_body(status, message)),
        content_type="application/json",
        headers=headers,
    )


class FakeUpstream:
    """A fake OpenAI-compatible server on 127.0.0.1; use as an async context manager."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour: Behaviour = behaviour if behaviour is not None else Behaviour()
        self.received: list[Received] = []
        self.base_url: str = ""
        self.open_streams: int = 0
        self.closed_early: int = 0
        self.pieces_sent: int = 0  # streamed pieces written, over every request
        self._closed_event = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._closing = False
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._app = app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 = ephemeral) and set ``base_url``."""
        runner = web.AppRunner(
            self._app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        self._runner = runner
        self._closing = False
        bound_port = runner.addresses[0][1]
        self.base_url = f"http://{host}:{bound_port}/v1"

    async def close(self) -> None:
        """Stop listening and drop any streams still open (not counted as ``closed_early``)."""
        if self._runner is None:
            return
        self._closing = True
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_for_close(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once a response ended because its client went away early, else False."""
        try:
            async with asyncio.timeout(timeout):
                await self._closed_event.wait()
        except TimeoutError:
            return False
        return True

    def _client_gone(self) -> None:
        if not self._closing:
            self.closed_early += 1
            self._closed_event.set()

    async def _models(self, request: web.Request) -> web.Response:
        body = {
            "object": "list",
            "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}],
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = None
        body: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        self.received.append(Received(request.path, dict(request.headers), body))
        b = copy(self.behaviour)
        try:
            if b.first_delay:
                await asyncio.sleep(b.first_delay)  # a slow upstream: the behaviour asked
            if not isinstance(parsed, dict):
                return _error_response(400, "request body must be a JSON object")
            if b.fail_status is not None and self._should_fail():
                return _error_response(b.fail_status, b.fail_message, b.retry_after)
            if b.raw_body is not None:
                return web.Response(body=b.raw_body, content_type=b.raw_type)
            pieces, finish = _pieces(b, body)
            if b.tool_calls:
                finish = "tool_calls"
            finish = b.finish_reason or finish
            if body.get("stream") and not b.unstreamed:
                return await self._stream(request, b, body, pieces, finish)
            return await self._complete(request, b, body, pieces, finish)
        except asyncio.CancelledError:
            self._client_gone()
            raise

    def _should_fail(self) -> bool:
        if self.behaviour.fail_times is None:
            return True
        if self.behaviour.fail_times <= 0:
            return False
        self.behaviour.fail_times -= 1
        return True

    async def _complete(
        self,
        request: web.Request,
        b: Behaviour,
        body: dict[str, Any],
        pieces: list[str],
        finish: str,
    ) -> web.StreamResponse:
        if b.delay and pieces:
            await asyncio.sleep(b.delay * len(pieces))  # as long as streaming them would take
        if b.break_after is not None:
            if request.transport is not None:
                request.transport.abort()
            return web.Response()
        if b.malformed_after is not None:
            return web.Response(body=b"{not json", content_type="application/json")
        if b.error_event_after is not None:
            body_bytes = orjson.dumps(_error_event(b.fail_message))
            return web.Response(body=body_bytes, content_type="application/json")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces) or None}
        if b.reasoning is not None:
            message[b.reasoning_field] = "".join(b.reasoning)
        if b.tool_calls:
            message["tool_calls"] = [
                {"id": _call_id(i), "type": "function", "function": dict(call)}
                for i, call in enumerate(b.tool_calls)
            ]
        answer: dict[str, Any] = {
            "id": f"chatcmpl-fake{next(_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", MODEL_ID),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if b.usage:
            answer["usage"] = _usage_of(b, body, len(pieces))
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        b: Behaviour,
        body: dict[str, Any],
        pieces: list[str],
        finish: str,
    ) -> web.StreamResponse:
        head: dict[str, Any] = {
            "id": f"chatcmpl-fake{next(_ids)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", MODEL_ID),
        }
        # Every piece frame is prefix + orjson.dumps(piece) + suffix: one concat, one write.
        common = b"data: " + orjson.dumps(head)[:-1] + b',"choices":[{"index":0,"delta":{'
        first_prefix = common + b'"role":"assistant","content":'
        prefix = common + b'"content":'
        options = body.get("stream_options")
        want_usage = b.usage and isinstance(options, dict) and bool(options.get("include_usage"))
        dumps = orjson.dumps
        n = len(pieces)

        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        self.open_streams += 1
        try:
            await resp.prepare(request)
            write: Write = resp.write
            if b.one_write:
                burst: list[bytes] = []

                async def into_burst(data: bytes) -> None:
                    burst.append(data)

                write = into_burst

            if n == 0:
                await write(first_prefix + b'""' + _PIECE_SUFFIX)
            if b.endless:
                frames = [prefix + dumps(piece) + _PIECE_SUFFIX for piece in pieces]
                await _forever(write, frames or [prefix + b'"x"' + _PIECE_SUFFIX], b.delay)
            if b.long_line is not None:
                if n:
                    await write(first_prefix + dumps(pieces[0]) + _PIECE_SUFFIX)
                await _unended_line(write, b.long_line)
                await resp.write_eof()
                return resp
            for reasoning in b.reasoning or ():
                await write(_delta_frame(head, {b.reasoning_field: reasoning}))
            for i in range(n + 1):
                if i and b.delay:
                    await asyncio.sleep(b.delay)  # the pace between pieces
                if i == b.break_after:
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if i == b.malformed_after:
                    await write(_MALFORMED)
                if i == b.error_event_after:
                    await write(b"data: " + dumps(_error_event(b.fail_message)) + b"\n\n")
                    await write(_DONE)
                    return resp
                if i == n:
                    break
                await write((prefix if i else first_prefix) + dumps(pieces[i]) + _PIECE_SUFFIX)
                self.pieces_sent += 1
            for delta in _tool_call_deltas(b):
                await write(_delta_frame(head, delta))
            ending: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": finish}
            if b.no_delta:
                del ending["delta"]
            last = dict(head, choices=[ending])
            await write(b"data: " + dumps(last) + b"\n\n")
            if want_usage:
                tail = dict(head, choices=[], usage=_usage_of(b, body, n))
                await write(b"data: " + dumps(tail) + b"\n\n")
            await write(_DONE)
            if b.one_write:
                await resp.write(b"".join(burst))
            await resp.write_eof()
        except ConnectionError:
            self._client_gone()
        finally:
            self.open_streams -= 1
        return resp


def _call_id(index: int) -> str:
    return f"call_fake{index}"


def _delta_frame(head: dict[str, Any], delta: dict[str, Any]) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    return b"data: " + orjson.dumps(dict(head, choices=[choice])) + b"\n\n"


def _tool_call_deltas(b: Behaviour) -> list[dict[str, Any]]:
    """The streamed deltas of the answer's tool calls, as OpenAI sends them."""
    deltas: list[dict[str, Any]] = []
    size = max(b.argument_piece, 1)
    for index, call in enumerate(b.tool_calls or ()):
        first = {"name": call["name"], "arguments": ""}
        opening = {"index": index, "id": _call_id(index), "type": "function", "function": first}
        deltas.append({"tool_calls": [opening]})
        arguments = call.get("arguments", "")
        for start in range(0, len(arguments), size):
            piece = {"arguments": arguments[start : start + size]}
            deltas.append({"tool_calls": [{"index": index, "function": piece}]})
    return deltas


async def _forever(write: Write, frames: list[bytes], delay: float) -> None:
    """The endless mode: the frames over and over until the client goes away."""
    for sent, frame in enumerate(itertools.cycle(frames)):
        await write(frame)
        if delay:
            await asyncio.sleep(delay)  # the pace between pieces
        elif not sent % 64:
            await asyncio.sleep(0)  # a write to a fast reader may never wait: let others run


async def _unended_line(write: Write, size: int) -> None:
    """``data: xxx...`` of ``size`` bytes, written 64 KiB at a time, and no newline."""
    await write(b"data: ")
    block = b"x" * 65536
    left = size - 6
    while left > 0:
        await write(block[:left])
        left -= len(block)


def _main() -> None:
    from pathlib import Path

    parser = argparse.ArgumentParser(description="Run the fake OpenAI-compatible upstream.")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--token-count", type=int, default=None, help="pieces per answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between pieces")
    parser.add_argument("--endless", action="store_true", help="stream, never finishing")
    parser.add_argument(
        "--token-chars", type=int, default=None, help="pieces of this many characters each"
    )
    parser.add_argument(
        "--ready-file", default=None, help="write the base URL to this file once listening"
    )
    args = parser.parse_args()

    async def run() -> None:
        tokens = None if args.token_chars is None else ["x" * args.token_chars]
        behaviour = Behaviour(
            tokens=tokens, token_count=args.token_count, delay=args.delay, endless=args.endless
        )
        upstream = FakeUpstream(behaviour)
        await upstream.start(port=args.port)
        print(f"fake upstream at {upstream.base_url}", flush=True)
        if args.ready_file:
            ready = Path(args.ready_file)
            partial = ready.with_name(ready.name + ".part")
            partial.write_text(upstream.base_url)
            partial.replace(ready)  # readers never see a half-written URL
        try:
            while True:  # nobody reads `received` here: keep a long run's memory flat
                await asyncio.sleep(1.0)  # once a second: a pace, nothing is waited for
                upstream.received.clear()
        finally:
            await upstream.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    _main()
