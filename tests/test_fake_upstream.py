"""Tests for the fake OpenAI-compatible upstream, driven by a real aiohttp client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from chatbus.testing.fake_upstream import DEFAULT_TOKENS, Behaviour, FakeUpstream
from tests.waiting import wait_until

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "echo this back please"},
]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _request(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "some-model", "messages": MESSAGES, "stream": stream, **extra}


async def _frames(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The payloads of the ``data:`` lines of an SSE response, in order."""
    frames: list[bytes] = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            frames.append(line[6:].rstrip(b"\n"))
        else:
            assert line == b"\n", line
    return frames


async def _stream(session: aiohttp.ClientSession, up: FakeUpstream, **extra: Any) -> list[bytes]:
    async with session.post(f"{up.base_url}/chat/completions", json=_request(**extra)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return await _frames(resp)


def _content(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


async def test_stream_frames(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    frames = await _stream(session, upstream)
    assert frames[-1] == b"[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    assert len(chunks) == len(DEFAULT_TOKENS) + 1
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    assert ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "some-model"
        assert isinstance(c["created"], int)
        assert "usage" not in c
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert _content(chunks) == "".join(DEFAULT_TOKENS)

    assert len(upstream.received) == 1
    got = upstream.received[0]
    assert got.path == "/v1/chat/completions"
    assert got.body["messages"] == MESSAGES
    assert "Content-Type" in got.headers
    assert upstream.open_streams == 0
    assert upstream.closed_early == 0


async def test_stream_usage_chunk(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour.token_count = 5
    frames = await _stream(session, upstream, stream_options={"include_usage": True})
    assert frames[-1] == b"[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    assert _content(chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
    }

    upstream.behaviour.usage = False
    frames = await _stream(session, upstream, stream_options={"include_usage": True})
    assert all(b'"usage"' not in f for f in frames)


async def test_non_stream(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    for body in (_request(stream=False), {"model": "m2", "messages": MESSAGES}):
        async with session.post(f"{upstream.base_url}/chat/completions", json=body) as resp:
            assert resp.status == 200
            data = await resp.json()
        assert data["object"] == "chat.completion"
        assert data["id"].startswith("chatcmpl-")
        assert data["model"] == body["model"]
        assert data["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from fake upstream"},
                "finish_reason": "stop",
            }
        ]
        assert data["usage"]["completion_tokens"] == len(DEFAULT_TOKENS)
        assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + len(DEFAULT_TOKENS)
    assert len(upstream.received) == 2


async def test_max_tokens(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    chunks = [orjson.loads(f) for f in (await _stream(session, upstream, max_tokens=2))[:-1]]
    assert _content(chunks) == "Hello from"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    upstream.behaviour.token_count = 100
    url = f"{upstream.base_url}/chat/completions"
    async with session.post(url, json=_request(stream=False, max_tokens=3)) as resp:
        data = await resp.json()
    assert data["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3

    # A limit that is not reached does not change the finish reason.
    chunks = [orjson.loads(f) for f in (await _stream(session, upstream, max_tokens=500))[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(chunks) == 101


async def test_fail_status(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour = Behaviour(fail_status=429, fail_message="slow down", retry_after="7")
    for stream in (True, False):
        url = f"{upstream.base_url}/chat/completions"
        async with session.post(url, json=_request(stream=stream)) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "7"
            assert resp.content_type == "application/json"
            data = await resp.json()
        assert data["error"]["message"] == "slow down"
        assert data["error"]["type"]
        assert "code" in data["error"]
    assert len(upstream.received) == 2

    upstream.behaviour = Behaviour(fail_status=503)
    async with session.post(f"{upstream.base_url}/chat/completions", json=_request()) as resp:
        assert resp.status == 503
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["error"]["type"] == "server_error"


async def test_break_after(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour.token_count = 10
    upstream.behaviour.break_after = 3
    frames: list[bytes] = []
    url = f"{upstream.base_url}/chat/completions"
    with pytest.raises(aiohttp.ClientError):
        async with session.post(url, json=_request()) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    frames.append(line[6:].rstrip(b"\n"))
    assert len(frames) == 3
    assert b"[DONE]" not in frames
    assert _content([orjson.loads(f) for f in frames]) == "tok0 tok1 tok2 "
    assert upstream.closed_early == 0
    # The server keeps working afterwards.
    upstream.behaviour.break_after = None
    assert (await _stream(session, upstream))[-1] == b"[DONE]"


async def test_malformed_after(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour.malformed_after = 2
    frames = await _stream(session, upstream)
    assert frames[2] == b"{not json"
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(frames[2])
    assert frames[-1] == b"[DONE]"
    chunks = [orjson.loads(f) for i, f in enumerate(frames[:-1]) if i != 2]
    assert _content(chunks) == "".join(DEFAULT_TOKENS)


async def test_error_event_after(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour = Behaviour(error_event_after=1, fail_message="engine died")
    frames = await _stream(session, upstream)
    assert len(frames) == 3
    assert orjson.loads(frames[0])["choices"][0]["delta"]["content"] == "Hello"
    assert orjson.loads(frames[1]) == {
        "error": {"message": "engine died", "type": "server_error", "code": 500}
    }
    assert frames[2] == b"[DONE]"


async def test_echo_and_tokens(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour.echo = True
    chunks = [orjson.loads(f) for f in (await _stream(session, upstream))[:-1]]
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[:-1]]
    assert pieces == ["echo", " this", " back", " please"]

    upstream.behaviour = Behaviour(tokens=["a", "\u00e9\n", '"q"'])
    chunks = [orjson.loads(f) for f in (await _stream(session, upstream))[:-1]]
    assert _content(chunks) == 'a\u00e9\n"q"'


async def test_models(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{upstream.base_url}/models") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["fake-model"]
    assert upstream.received == []


async def test_bad_json(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    url = f"{upstream.base_url}/chat/completions"
    async with session.post(url, data=b"{nope", headers={"Authorization": "Bearer k"}) as resp:
        assert resp.status == 400
        assert "error" in await resp.json()
    assert upstream.received[0].body == {}
    assert upstream.received[0].headers["Authorization"] == "Bearer k"


async def test_first_delay(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour.first_delay = 0.3
    url = f"{upstream.base_url}/chat/completions"
    task = asyncio.ensure_future(session.post(url, json=_request()))
    await wait_until(lambda: upstream.received, "the request at the upstream")
    assert len(upstream.received) == 1  # recorded before the delay
    assert not task.done()
    resp = await task
    async with resp:
        assert (await _frames(resp))[-1] == b"[DONE]"


async def test_client_closes_mid_stream(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(token_count=1000, delay=5.0)
    assert not await upstream.wait_for_close(0.01)
    resp = await session.post(f"{upstream.base_url}/chat/completions", json=_request())
    line = await resp.content.readline()
    assert line.startswith(b"data: ")
    assert upstream.open_streams == 1
    started = time.monotonic()
    resp.close()
    assert await upstream.wait_for_close(1.0)
    assert time.monotonic() - started < 1.0
    assert upstream.closed_early == 1
    await wait_until(lambda: upstream.open_streams == 0, "the stream closed")


async def test_close_with_open_stream_is_not_closed_early(session: aiohttp.ClientSession) -> None:
    up = FakeUpstream(Behaviour(token_count=100, delay=5.0))
    await up.start()
    resp = await session.post(f"{up.base_url}/chat/completions", json=_request())
    await resp.content.readline()
    started = time.monotonic()
    await up.close()
    assert time.monotonic() - started < 2.0
    assert up.closed_early == 0
    resp.close()


async def test_many_concurrent_slow_streams(
    upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.behaviour = Behaviour(token_count=5, delay=0.05)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as many:
        results = await asyncio.gather(*(_stream(many, upstream) for _ in range(200)))
    assert all(r[-1] == b"[DONE]" and len(r) == 7 for r in results)
    assert upstream.closed_early == 0
    assert upstream.open_streams == 0


async def test_endless(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour = Behaviour(tokens=["a", "b"], endless=True)
    url = f"{upstream.base_url}/chat/completions"
    texts: list[str] = []
    async with session.post(url, json=_request()) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                chunk = orjson.loads(line[6:])
                assert chunk["choices"][0]["finish_reason"] is None
                texts.append(chunk["choices"][0]["delta"]["content"])
                if len(texts) == 1000:  # far more than two pieces, and still going
                    break
    assert texts[:4] == ["a", "b", "a", "b"]
    assert await upstream.wait_for_close(5.0)  # it stops when the client goes


async def test_long_line(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour = Behaviour(long_line=200_000)
    async with session.post(f"{upstream.base_url}/chat/completions", json=_request()) as resp:
        body = await resp.read()
    first, line = body.split(b"\n\n")
    assert orjson.loads(first[6:])["choices"][0]["delta"]["content"] == "Hello"
    assert len(line) == 200_000
    assert line.startswith(b"data: xxx")
    assert b"\n" not in line


@pytest.mark.parametrize("stream", [True, False])
async def test_raw_body(
    upstream: FakeUpstream, session: aiohttp.ClientSession, stream: bool
) -> None:
    upstream.behaviour = Behaviour(raw_body=b"<html>down</html>")
    url = f"{upstream.base_url}/chat/completions"
    async with session.post(url, json=_request(stream=stream)) as resp:
        assert (resp.status, resp.content_type) == (200, "text/html")
        assert await resp.read() == b"<html>down</html>"
    upstream.behaviour = Behaviour(raw_body=b"\x00\xff", raw_type=None)
    async with session.post(url, json=_request(stream=stream)) as resp:
        assert (resp.status, resp.content_type) == (200, "application/octet-stream")
        assert await resp.read() == b"\x00\xff"


async def test_unstreamed(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    upstream.behaviour = Behaviour(unstreamed=True)
    async with session.post(f"{upstream.base_url}/chat/completions", json=_request()) as resp:
        assert resp.content_type == "application/json"
        data = await resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "Hello from fake upstream"
    assert data["usage"]["completion_tokens"] == len(DEFAULT_TOKENS)


async def test_usage_values(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    values = {"prompt_tokens": "x", "completion_tokens": -1, "total_tokens": 1e25}
    upstream.behaviour = Behaviour(usage_values=values)
    frames = await _stream(session, upstream, stream_options={"include_usage": True})
    assert orjson.loads(frames[-2])["usage"] == values
    url = f"{upstream.base_url}/chat/completions"
    async with session.post(url, json=_request(stream=False)) as resp:
        assert (await resp.json())["usage"] == values
