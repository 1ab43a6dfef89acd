"""The OpenAI-compatible provider against a real fake upstream over loopback HTTP."""

from __future__ import annotations

import asyncio
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from pydantic import ValidationError

from chatbus.testing.fake_upstream import DEFAULT_TOKENS, Behaviour, FakeUpstream
from core.config import first_problem
from core.providers import (
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
)
from plugins.providers.openai_compat import OpenAICompatProvider, make_openai_compat

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello please"},
]
KEY_VAR = "CHATBUS_TEST_OPENAI_KEY"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make(http: aiohttp.ClientSession, **options: Any) -> OpenAICompatProvider:
    return make_openai_compat(ModelSpec(name="m", provider="openai_compat", options=options), http)


def provider_for(
    upstream: FakeUpstream, http: aiohttp.ClientSession, **options: Any
) -> OpenAICompatProvider:
    return make(
        http, **{"base_url": upstream.base_url, "model": "fake-model", "read_timeout": 5, **options}
    )


async def collect(
    provider: OpenAICompatProvider, call: ModelCall | None = None
) -> tuple[list[str], list[Usage]]:
    pieces: list[str] = []
    usages: list[Usage] = []
    async for item in provider.stream(call or ModelCall(messages=MESSAGES)):
        if isinstance(item, Usage):
            usages.append(item)
        elif not isinstance(item, Finish):  # the finish reason: tested on its own
            assert isinstance(item, str)
            pieces.append(item)
    return pieces, usages


async def failure(provider: OpenAICompatProvider, call: ModelCall | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await collect(provider, call)
    return info.value


ServeRaw = Callable[..., Awaitable[str]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[ServeRaw]:
    """A tiny real server answering every chat request with the exact bytes given: for
    upstream shapes the fake cannot produce (a clean end without finishing, an HTML 502)."""
    runners: list[web.AppRunner] = []

    async def serve(
        frames: list[bytes], status: int = 200, content_type: str = "text/event-stream"
    ) -> str:
        async def handler(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
            await response.prepare(request)
            for frame in frames:
                await response.write(frame)
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    yield serve
    for runner in runners:
        await runner.cleanup()


def frame(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def piece(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return frame({"choices": [choice], "usage": None})


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the happy path and what the upstream receives ---------------------------------------


async def test_deltas_join_to_upstream_tokens_and_usage_is_reported(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(tokens=["Hi", " there", ",", " friend", "!"])
    pieces, usages = await collect(provider_for(upstream, http))
    assert pieces == ["Hi", " there", ",", " friend", "!"]
    # The fake counts prompt tokens as whitespace-split words of every message: 3 + 3.
    assert usages == [Usage(prompt_tokens=6, completion_tokens=5)]


async def test_default_tokens_and_usage_comes_last(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    items = [item async for item in provider_for(upstream, http).stream(ModelCall(MESSAGES))]
    stop = Finish("stop")
    assert items == [*DEFAULT_TOKENS, stop, Usage(prompt_tokens=6, completion_tokens=4)]


async def test_request_body_and_path(upstream: FakeUpstream, http: aiohttp.ClientSession) -> None:
    call = ModelCall(messages=MESSAGES, temperature=0.3, max_tokens=50)
    await collect(provider_for(upstream, http), call)
    assert len(upstream.received) == 1
    received = upstream.received[0]
    assert received.path == "/v1/chat/completions"
    assert received.body["model"] == "fake-model"
    assert received.body["messages"] == MESSAGES
    assert received.body["temperature"] == 0.3
    assert received.body["stream"] is True
    assert received.body["stream_options"] == {"include_usage": True}
    assert received.body["max_tokens"] == 50
    assert received.headers["Content-Type"] == "application/json"


async def test_max_tokens_none_is_absent_from_the_body(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await collect(provider_for(upstream, http), ModelCall(messages=MESSAGES, max_tokens=None))
    body = upstream.received[0].body
    assert "max_tokens" not in body
    assert "max_completion_tokens" not in body
    assert set(body) == {"model", "messages", "stream", "stream_options"}  # nothing forced


async def test_max_tokens_limits_the_upstream_answer(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    pieces, usages = await collect(
        provider_for(upstream, http), ModelCall(messages=MESSAGES, max_tokens=2)
    )
    assert pieces == list(DEFAULT_TOKENS[:2])
    assert usages == [Usage(prompt_tokens=6, completion_tokens=2)]


async def test_include_usage_false_omits_stream_options_and_usage(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    pieces, usages = await collect(provider_for(upstream, http, include_usage=False))
    assert "stream_options" not in upstream.received[0].body
    assert "".join(pieces) == "".join(DEFAULT_TOKENS)
    assert usages == []


async def test_extra_body_fields_are_passed_through(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    extra = {"top_p": 0.9, "stop": ["\n\n"], "seed": 7, "logit_bias": {"50256": -100}}
    await collect(provider_for(upstream, http, extra_body=extra))
    body = upstream.received[0].body
    for name, value in extra.items():
        assert body[name] == value
    assert body["model"] == "fake-model"
    assert body["stream"] is True


async def test_trailing_slash_on_base_url_is_ignored(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    pieces, _ = await collect(provider_for(upstream, http, base_url=upstream.base_url + "/"))
    assert "".join(pieces) == "".join(DEFAULT_TOKENS)
    assert upstream.received[0].path == "/v1/chat/completions"


async def test_bearer_key_from_the_named_environment_variable(
    upstream: FakeUpstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, "sk-test-123")
    await collect(provider_for(upstream, http, api_key_env=KEY_VAR))
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-test-123"


async def test_no_authorization_header_without_api_key_env(
    upstream: FakeUpstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    await collect(provider_for(upstream, http))
    headers = {name.lower() for name in upstream.received[0].headers}
    assert "authorization" not in headers


@pytest.mark.parametrize("value", [None, ""])
async def test_an_unset_key_variable_sends_no_key(
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
) -> None:
    # api_key_env is optional: a server that needs no key is called without one.
    if value is None:
        monkeypatch.delenv(KEY_VAR, raising=False)
    else:
        monkeypatch.setenv(KEY_VAR, value)
    with structlog.testing.capture_logs() as logs:
        provider = provider_for(upstream, http, api_key_env=KEY_VAR)
    assert [e["variable"] for e in logs if e["event"].startswith("api key variable not set")] == [
        KEY_VAR
    ]
    pieces, _ = await collect(provider)
    assert pieces == list(DEFAULT_TOKENS)
    headers = {name.lower() for name in upstream.received[0].headers}
    assert "authorization" not in headers


# --- HTTP status errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (401, AuthenticationFailed, "authentication_failed"),
        (403, AuthenticationFailed, "authentication_failed"),
        (429, RateLimited, "rate_limited"),
        (400, BadRequest, "bad_request"),
        (404, BadRequest, "bad_request"),
        (500, UpstreamUnavailable, "upstream_unavailable"),
        (502, UpstreamUnavailable, "upstream_unavailable"),
        (503, UpstreamUnavailable, "upstream_unavailable"),
        (504, UpstreamTimeout, "upstream_timeout"),
    ],
)
async def test_status_errors_map_to_types(
    upstream: FakeUpstream,
    http: aiohttp.ClientSession,
    status: int,
    error_class: type[ProviderError],
    error_type: str,
) -> None:
    upstream.behaviour = Behaviour(fail_status=status, fail_message="nope, sorry")
    exc = await failure(provider_for(upstream, http))
    assert type(exc) is error_class
    assert exc.type == error_type
    assert str(exc) == f"the upstream answered {status}: nope, sorry"
    assert len(upstream.received) == 1


async def test_rate_limited_carries_retry_after(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(fail_status=429, retry_after="17")
    exc = await failure(provider_for(upstream, http))
    assert type(exc) is RateLimited
    assert exc.retry_after == "17"
    assert exc.retryable is True


async def test_rate_limited_without_retry_after(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(fail_status=429)
    exc = await failure(provider_for(upstream, http))
    assert type(exc) is RateLimited
    assert exc.retry_after is None


async def test_context_length_400_is_context_window_exceeded(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    message = "This model's maximum context length is 4096 tokens"
    upstream.behaviour = Behaviour(fail_status=400, fail_message=message)
    exc = await failure(provider_for(upstream, http))
    assert type(exc) is ContextWindowExceeded
    assert exc.type == "context_window_exceeded"
    assert isinstance(exc, BadRequest)
    assert message in str(exc)


# --- failures mid-stream and on the way ---------------------------------------------------


async def test_broken_connection_mid_stream_is_unavailable(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(break_after=2)
    provider = provider_for(upstream, http)
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(ModelCall(MESSAGES)):
            assert isinstance(item, str)
            pieces.append(item)
    assert type(info.value) is UpstreamUnavailable
    assert info.value.type == "upstream_unavailable"
    assert pieces == list(DEFAULT_TOKENS[:2])


async def test_broken_connection_before_any_piece_is_unavailable(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(break_after=0)
    exc = await failure(provider_for(upstream, http))
    assert type(exc) is UpstreamUnavailable


async def test_malformed_frame_is_malformed_response(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(malformed_after=1)
    provider = provider_for(upstream, http)
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(ModelCall(MESSAGES)):
            pieces.append(item)  # type: ignore[arg-type]
    assert type(info.value) is MalformedResponse
    assert info.value.type == "malformed_response"
    assert pieces == [DEFAULT_TOKENS[0]]


async def test_error_event_mid_stream_carries_the_upstream_message(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(error_event_after=2, fail_message="the GPU caught fire")
    provider = provider_for(upstream, http)
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(ModelCall(MESSAGES)):
            pieces.append(item)  # type: ignore[arg-type]
    assert "the GPU caught fire" in str(info.value)
    assert pieces == list(DEFAULT_TOKENS[:2])


async def test_connection_refused_is_unavailable(http: aiohttp.ClientSession) -> None:
    port = closed_port()
    provider = make(http, base_url=f"http://127.0.0.1:{port}/v1", model="m", connect_timeout=2)
    exc = await failure(provider)
    assert type(exc) is UpstreamUnavailable
    assert exc.type == "upstream_unavailable"
    assert f"127.0.0.1:{port}" in str(exc)


async def test_slow_first_token_is_a_timeout(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(first_delay=2.0)
    provider = provider_for(upstream, http, read_timeout=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    exc = await failure(provider)
    assert type(exc) is UpstreamTimeout
    assert exc.type == "upstream_timeout"
    assert loop.time() - started < 1.5


async def test_silence_mid_stream_is_a_timeout(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(delay=2.0)
    provider = provider_for(upstream, http, read_timeout=0.3)
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(ModelCall(MESSAGES)):
            pieces.append(item)  # type: ignore[arg-type]
    assert type(info.value) is UpstreamTimeout
    assert pieces == [DEFAULT_TOKENS[0]]


# --- upstream shapes the fake cannot produce ---------------------------------------------


async def test_clean_end_without_finishing_is_unavailable(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    base_url = await raw_upstream([piece("Hi"), piece(" there")])
    provider = make(http, base_url=base_url, model="m")
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(ModelCall(MESSAGES)):
            pieces.append(item)  # type: ignore[arg-type]
    assert type(info.value) is UpstreamUnavailable
    assert pieces == ["Hi", " there"]


async def test_finish_reason_without_done_is_a_normal_end(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    base_url = await raw_upstream([piece("Hi"), piece("!", finish="stop")])
    pieces, usages = await collect(make(http, base_url=base_url, model="m"))
    assert pieces == ["Hi", "!"]
    assert usages == []


async def test_comments_event_lines_and_null_usage_are_ignored(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    frames = [
        b": keep-alive\n\n",
        b"event: message\n" + piece("a"),
        b'data:{"choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"length"}]}\n\n',
        frame({"choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
    ]
    base_url = await raw_upstream(frames)
    pieces, usages = await collect(make(http, base_url=base_url, model="m"))
    assert pieces == ["a", "b"]
    assert usages == [Usage(prompt_tokens=11, completion_tokens=2)]


@pytest.mark.parametrize(
    "bad",
    [
        frame([1, 2]),  # not an object
        frame({"choices": "nope"}),
    ],
)
async def test_unexpected_chunk_shapes_are_malformed(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession, bad: bytes
) -> None:
    base_url = await raw_upstream([piece("ok"), bad, b"data: [DONE]\n\n"])
    exc = await failure(make(http, base_url=base_url, model="m"))
    assert type(exc) is MalformedResponse


async def test_html_error_page_from_a_proxy(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    base_url = await raw_upstream([page], status=502, content_type="text/html")
    exc = await failure(make(http, base_url=base_url, model="m"))
    assert type(exc) is UpstreamUnavailable
    assert "502 Bad Gateway" in str(exc)


async def test_error_given_as_a_plain_string(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    body = orjson.dumps({"error": "model 'm' not found"})
    base_url = await raw_upstream([body], status=404, content_type="application/json")
    exc = await failure(make(http, base_url=base_url, model="m"))
    assert type(exc) is BadRequest
    assert str(exc) == "the upstream answered 404: model 'm' not found"


# --- bodies that are not the event stream asked for ---------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<!DOCTYPE html>\n<html><body>Welcome to nginx!</body></html>\n", "text/html"),
        (b"<html><body>captive portal</body></html>", None),  # no type, no newline
        (bytes(range(256)) * 4, None),  # random bytes, newlines among them
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png"),
        (b"<html>a proxy's page labelled as a stream</html>\n\n", "text/event-stream"),
    ],
)
async def test_a_200_that_is_no_event_stream_is_malformed(
    upstream: FakeUpstream, http: aiohttp.ClientSession, body: bytes, content_type: str | None
) -> None:
    upstream.behaviour = Behaviour(raw_body=body, raw_type=content_type)
    exc = await failure(provider_for(upstream, http))
    assert type(exc) is MalformedResponse
    assert exc.retryable is False
    assert "not an event stream" in str(exc)


async def test_a_stream_turning_into_html_midway_is_malformed(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    base_url = await raw_upstream([piece("Hi"), b"<html><body>502</body></html>"])
    pieces: list[str] = []
    with pytest.raises(MalformedResponse):
        async for item in make(http, base_url=base_url, model="m").stream(ModelCall(MESSAGES)):
            pieces.append(item)  # type: ignore[arg-type]
    assert pieces == ["Hi"]


@pytest.mark.parametrize("content_type", ["text/plain", ""])
async def test_an_event_stream_with_another_type_is_read_by_its_content(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession, content_type: str
) -> None:
    frames = [piece("Hi"), piece("!", finish="stop"), b"data: [DONE]\n\n"]
    base_url = await raw_upstream(frames, content_type=content_type)
    pieces, _ = await collect(make(http, base_url=base_url, model="m"))
    assert pieces == ["Hi", "!"]


async def test_an_unstreamed_json_answer_is_that_one_answer(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(unstreamed=True, tokens=["One", " answer"])
    items = [item async for item in provider_for(upstream, http).stream(ModelCall(MESSAGES))]
    assert items == ["One answer", Finish("stop"), Usage(prompt_tokens=6, completion_tokens=2)]
    assert upstream.received[0].body["stream"] is True  # it was asked to stream


@pytest.mark.parametrize("content_type", ["text/plain", ""])
async def test_an_unstreamed_json_answer_with_another_type_is_read_by_its_content(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession, content_type: str
) -> None:
    answer = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"content": "Hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
    }
    base_url = await raw_upstream([b"\n " + orjson.dumps(answer)], content_type=content_type)
    items = [
        item async for item in make(http, base_url=base_url, model="m").stream(ModelCall(MESSAGES))
    ]
    assert items == ["Hi", Finish("stop"), Usage(prompt_tokens=3, completion_tokens=1)]


async def test_an_unstreamed_error_body_with_200_is_an_error(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(unstreamed=True, error_event_after=0, fail_message="overload")
    exc = await failure(provider_for(upstream, http))
    assert str(exc) == "the upstream reported an error: overload"


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"choices": []}', b'{"object": "chat.completion"}', b"[1, 2]"]
)
async def test_an_unstreamed_body_that_is_no_answer_is_malformed(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession, body: bytes
) -> None:
    base_url = await raw_upstream([body], content_type="application/json")
    exc = await failure(make(http, base_url=base_url, model="m"))
    assert type(exc) is MalformedResponse


# --- lines and bodies too long ------------------------------------------------------------


async def test_a_line_that_never_ends_is_refused_at_the_limit(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(long_line=64 * 1024 * 1024)  # 64 MiB, no newline
    provider = provider_for(upstream, http)  # the default limit: 1 MiB
    pieces: list[str] = []
    with pytest.raises(MalformedResponse) as info:
        async for item in provider.stream(ModelCall(MESSAGES)):
            pieces.append(item)  # type: ignore[arg-type]
    assert str(info.value) == "the upstream sent a line longer than 1048576 bytes"
    assert pieces == [DEFAULT_TOKENS[0]]
    assert await upstream.wait_for_close(5.0)  # it stopped reading: the upstream is let go


async def test_the_line_limit_is_an_option(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession
) -> None:
    long_piece = piece("x" * 5000, finish="stop")  # one whole line, in one read
    base_url = await raw_upstream([long_piece, b"data: [DONE]\n\n"])
    exc = await failure(make(http, base_url=base_url, model="m", max_line_bytes=4096))
    assert str(exc) == "the upstream sent a line longer than 4096 bytes"
    pieces, _ = await collect(make(http, base_url=base_url, model="m", max_line_bytes=8192))
    assert pieces == ["x" * 5000]


async def test_an_unstreamed_answer_longer_than_the_line_limit_is_refused(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(unstreamed=True, tokens=["y" * 10_000])
    exc = await failure(provider_for(upstream, http, max_line_bytes=4096))
    assert str(exc) == "the upstream sent a JSON answer longer than 4096 bytes"


def test_the_line_limit_must_be_positive(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValidationError):
        make(http, base_url="http://127.0.0.1:1/v1", model="m", max_line_bytes=0)


# --- usage values -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["x", "7", -1, 1e25, 2.0, True, 2**60, [3], {"n": 1}])
@pytest.mark.parametrize("unstreamed", [False, True])
async def test_invalid_token_counts_are_dropped(
    upstream: FakeUpstream, http: aiohttp.ClientSession, bad: Any, unstreamed: bool
) -> None:
    values = {"prompt_tokens": bad, "completion_tokens": 4, "total_tokens": "lots"}
    upstream.behaviour = Behaviour(usage_values=values, unstreamed=unstreamed)
    pieces, usages = await collect(provider_for(upstream, http))
    assert "".join(pieces) == "".join(DEFAULT_TOKENS)
    assert usages == [Usage(prompt_tokens=None, completion_tokens=4)]


async def test_dropped_counts_make_one_log_line_without_their_values(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    values = {"prompt_tokens": "sk-like " * 1000, "completion_tokens": -3}
    upstream.behaviour = Behaviour(usage_values=values)
    with structlog.testing.capture_logs() as logs:
        _, usages = await collect(provider_for(upstream, http))
    assert usages == []
    assert logs == [
        {
            "event": "invalid token counts dropped",
            "log_level": "warning",
            "dropped": {"prompt_tokens": "str", "completion_tokens": "int"},
        }
    ]


@pytest.mark.parametrize("usage", ["12 tokens", 12, [1, 2], {"prompt_tokens": -5}])
async def test_a_usage_with_no_valid_count_is_none(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession, usage: Any
) -> None:
    frames = [piece("Hi", finish="stop"), frame({"choices": [], "usage": usage})]
    base_url = await raw_upstream([*frames, b"data: [DONE]\n\n"])
    pieces, usages = await collect(make(http, base_url=base_url, model="m"))
    assert (pieces, usages) == (["Hi"], [])


# --- the key never leaks ------------------------------------------------------------------


async def test_key_echoed_by_the_upstream_is_redacted(
    upstream: FakeUpstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-DISTINCTIVE-9f8e7d6c5b4a"
    monkeypatch.setenv(KEY_VAR, key)
    upstream.behaviour = Behaviour(fail_status=401, fail_message=f"bad key {key}")
    exc = await failure(provider_for(upstream, http, api_key_env=KEY_VAR))
    assert type(exc) is AuthenticationFailed
    assert key not in str(exc)
    assert key not in repr(exc)
    assert "[redacted]" in str(exc)
    assert str(exc) == "the upstream answered 401: bad key [redacted]"
    # What a log line with exc_info shows: the unredacted original is suppressed context.
    assert key not in "".join(traceback.format_exception(exc))


async def test_a_password_in_the_base_url_is_never_in_an_error(
    http: aiohttp.ClientSession,
) -> None:
    """A proxy's basic auth may sit in `base_url`: errors name the upstream without it."""
    base_url = f"http://chatbus:pw-DISTINCTIVE-4321@127.0.0.1:{closed_port()}/v1"
    exc = await failure(make(http, base_url=base_url, model="m"))
    assert type(exc) is UpstreamUnavailable
    assert "pw-DISTINCTIVE-4321" not in "".join(traceback.format_exception(exc))
    assert f"cannot connect to http://127.0.0.1:{base_url.rsplit(':', 1)[1]}" in str(exc)


async def test_redaction_keeps_retry_after(
    upstream: FakeUpstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-DISTINCTIVE-rate-1234"
    monkeypatch.setenv(KEY_VAR, key)
    upstream.behaviour = Behaviour(
        fail_status=429, fail_message=f"slow down {key}", retry_after="9"
    )
    exc = await failure(provider_for(upstream, http, api_key_env=KEY_VAR))
    assert type(exc) is RateLimited
    assert key not in str(exc)
    assert "[redacted]" in str(exc)
    assert exc.retry_after == "9"


async def test_key_echoed_in_an_error_event_is_redacted(
    upstream: FakeUpstream, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-DISTINCTIVE-event-5678"
    monkeypatch.setenv(KEY_VAR, key)
    upstream.behaviour = Behaviour(error_event_after=1, fail_message=f"key {key} revoked")
    exc = await failure(provider_for(upstream, http, api_key_env=KEY_VAR))
    assert key not in str(exc)
    assert "key [redacted] revoked" in str(exc)


# --- cancellation -------------------------------------------------------------------------


async def test_closing_the_stream_early_closes_the_upstream_connection(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(delay=0.5)
    stream = provider_for(upstream, http).stream(ModelCall(MESSAGES))
    first = await anext(stream)
    second = await anext(stream)
    assert [first, second] == list(DEFAULT_TOKENS[:2])
    await stream.aclose()
    assert await upstream.wait_for_close(1.0) is True
    assert upstream.closed_early == 1


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"model": "m"}, "base_url"),
        ({"base_url": "http://127.0.0.1:1/v1"}, "model"),
    ],
)
def test_missing_required_option(http: aiohttp.ClientSession, options: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, **options)
    errors = info.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [((field,), "missing")]


def test_base_url_must_be_http(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, base_url="ftp://x", model="m")
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [("base_url",)]
    assert "http://" in str(info.value)


def test_api_key_option_is_refused(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, base_url="http://127.0.0.1:1/v1", model="m", api_key="sk-in-the-file")
    errors = info.value.errors()
    assert len(errors) == 1
    assert "keys never go in the file" in errors[0]["msg"]
    assert "api_key_env" in errors[0]["msg"]
    # The one line the model registry reports names the rule, not the key.
    problem = first_problem(info.value, "models.m")
    assert "keys never go in the file" in problem
    assert "sk-in-the-file" not in problem


def test_unknown_option_is_refused(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, base_url="http://127.0.0.1:1/v1", model="m", temprature=0.1)
    errors = info.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [(("temprature",), "extra_forbidden")]


@pytest.mark.parametrize("name", ["read_timeout", "connect_timeout", "total_timeout"])
def test_timeouts_must_be_positive(http: aiohttp.ClientSession, name: str) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, base_url="http://127.0.0.1:1/v1", model="m", **{name: 0})
    assert [e["loc"] for e in info.value.errors()] == [(name,)]


# Provider contract v2: reasoning, tool calls, finish reasons (#14.2)


async def chunks_of(provider: OpenAICompatProvider) -> list[Chunk]:
    return [item async for item in provider.stream(ModelCall(MESSAGES))]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("unstreamed", [False, True])
async def test_reasoning_is_relayed_beside_the_text(
    upstream: FakeUpstream, http: aiohttp.ClientSession, field: str, unstreamed: bool
) -> None:
    upstream.behaviour.reasoning = ["Let me ", "think."]
    upstream.behaviour.reasoning_field = field
    upstream.behaviour.unstreamed = unstreamed
    chunks = await chunks_of(provider_for(upstream, http))
    reasoning = "".join(c.text for c in chunks if isinstance(c, Reasoning))
    text = "".join(c for c in chunks if isinstance(c, str))
    assert (reasoning, text) == ("Let me think.", "".join(DEFAULT_TOKENS))


@pytest.mark.parametrize("unstreamed", [False, True])
async def test_tool_calls_are_relayed_with_their_finish_reason(
    upstream: FakeUpstream, http: aiohttp.ClientSession, unstreamed: bool
) -> None:
    upstream.behaviour.tokens = []
    upstream.behaviour.unstreamed = unstreamed
    upstream.behaviour.tool_calls = [
        {"name": "one", "arguments": '{"a": 1}'},
        {"name": "two", "arguments": "{}"},
    ]
    chunks = await chunks_of(provider_for(upstream, http))
    calls = [c for c in chunks if isinstance(c, ToolCallDelta)]
    firsts = [c for c in calls if c.id is not None]
    assert [(c.index, c.id, c.name) for c in firsts] == [
        (0, "call_fake0", "one"),
        (1, "call_fake1", "two"),
    ]
    joined = ["".join(c.arguments for c in calls if c.index == i) for i in (0, 1)]
    assert joined == ['{"a": 1}', "{}"]
    assert [c for c in chunks if isinstance(c, Finish)] == [Finish("tool_calls")]
    assert not [c for c in chunks if isinstance(c, str)]


@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_the_finish_reason_is_the_upstream_s(
    upstream: FakeUpstream, http: aiohttp.ClientSession, reason: str
) -> None:
    upstream.behaviour.finish_reason = reason
    chunks = await chunks_of(provider_for(upstream, http))
    assert [c for c in chunks if isinstance(c, Finish)] == [Finish(reason)]


async def test_a_chunk_without_delta_is_no_failure(
    upstream: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream.behaviour.no_delta = True
    chunks = await chunks_of(provider_for(upstream, http))
    assert [c for c in chunks if isinstance(c, str)] == list(DEFAULT_TOKENS)
    assert Finish("stop") in chunks


@pytest.mark.parametrize(
    "call",
    [
        {"index": "0", "function": {"arguments": "x"}},
        {"index": 0, "function": {"name": 7}},
        {"index": -1},
    ],
)
async def test_a_malformed_tool_call_is_malformed(
    raw_upstream: ServeRaw, http: aiohttp.ClientSession, call: dict[str, Any]
) -> None:
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}
    base_url = await raw_upstream([frame(chunk), b"data: [DONE]\n\n"])
    error = await failure(make(http, base_url=base_url, model="m"))
    assert isinstance(error, MalformedResponse)
