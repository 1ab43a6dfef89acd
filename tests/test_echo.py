"""The offline echo provider: the last user message back, word by word."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from core.providers import ModelCall, ModelSpec, Usage
from plugins.providers.echo import EchoProvider, make_echo


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def make(http: aiohttp.ClientSession, **options: Any) -> EchoProvider:
    return make_echo(ModelSpec(name="echo", provider="echo", options=options), http)


async def run(provider: EchoProvider, call: ModelCall) -> tuple[list[str], Usage]:
    """The text pieces and the one Usage, checking Usage comes last and only once."""
    items = [item async for item in provider.stream(call)]
    assert items, "the stream yielded nothing"
    *pieces, usage = items
    assert isinstance(usage, Usage)
    assert all(isinstance(piece, str) for piece in pieces)
    return pieces, usage  # type: ignore[return-value]


def user(text: str) -> ModelCall:
    return ModelCall(messages=[{"role": "user", "content": text}])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello world", ["Hello ", "world"]),
        ("one  two   three", ["one  ", "two   ", "three"]),
        ("line one\nline two\n", ["line ", "one\n", "line ", "two\n"]),
        ("  leading and trailing  ", ["  leading ", "and ", "trailing  "]),
        ("Code: {{ x }} and {y}", ["Code: ", "{{ ", "x ", "}} ", "and ", "{y}"]),
        ("tab\tsep\r\nwin", ["tab\t", "sep\r\n", "win"]),
        ("single", ["single"]),
        ("   ", ["   "]),
    ],
)
async def test_echoes_the_message_exactly_in_word_pieces(
    http: aiohttp.ClientSession, text: str, expected: list[str]
) -> None:
    pieces, usage = await run(make(http), user(text))
    assert pieces == expected
    assert "".join(pieces) == text
    assert usage.completion_tokens == len(expected)


async def test_empty_message_yields_only_usage(http: aiohttp.ClientSession) -> None:
    pieces, usage = await run(make(http), user(""))
    assert pieces == []
    assert usage == Usage(prompt_tokens=0, completion_tokens=0)


async def test_no_user_message_yields_only_usage(http: aiohttp.ClientSession) -> None:
    call = ModelCall(messages=[{"role": "system", "content": "be nice"}])
    pieces, usage = await run(make(http), call)
    assert pieces == []
    assert usage == Usage(prompt_tokens=2, completion_tokens=0)


async def test_ignores_earlier_messages(http: aiohttp.ClientSession) -> None:
    call = ModelCall(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"},
            {"role": "user", "content": "new one here"},
        ]
    )
    pieces, usage = await run(make(http), call)
    assert pieces == ["new ", "one ", "here"]
    # Prompt tokens count the word pieces of every message: 2 + 2 + 2 + 3.
    assert usage == Usage(prompt_tokens=9, completion_tokens=3)


async def test_last_user_message_wins_even_before_an_assistant_turn(
    http: aiohttp.ClientSession,
) -> None:
    call = ModelCall(
        messages=[
            {"role": "user", "content": "first"},
            {"role": "user", "content": "second turn"},
            {"role": "assistant", "content": "ignored reply"},
        ]
    )
    pieces, usage = await run(make(http), call)
    assert pieces == ["second ", "turn"]
    assert usage == Usage(prompt_tokens=5, completion_tokens=2)


@pytest.mark.parametrize(
    ("max_tokens", "expected"),
    [
        (None, ["a ", "b ", "c ", "d"]),
        (1, ["a "]),
        (3, ["a ", "b ", "c "]),
        (4, ["a ", "b ", "c ", "d"]),
        (100, ["a ", "b ", "c ", "d"]),
    ],
)
async def test_max_tokens_is_a_word_count(
    http: aiohttp.ClientSession, max_tokens: int | None, expected: list[str]
) -> None:
    call = ModelCall(messages=[{"role": "user", "content": "a b c d"}], max_tokens=max_tokens)
    pieces, usage = await run(make(http), call)
    assert pieces == expected
    assert usage == Usage(prompt_tokens=4, completion_tokens=len(expected))


async def test_temperature_does_not_change_the_answer(http: aiohttp.ClientSession) -> None:
    cold, _ = await run(
        make(http), ModelCall([{"role": "user", "content": "x y"}], temperature=0.0)
    )
    hot, _ = await run(make(http), ModelCall([{"role": "user", "content": "x y"}], temperature=2.0))
    assert cold == hot == ["x ", "y"]


async def test_delay_waits_before_each_word(http: aiohttp.ClientSession) -> None:
    provider = make(http, delay=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrivals: list[float] = []
    async for item in provider.stream(user("one two three")):
        if isinstance(item, str):
            arrivals.append(loop.time() - started)
    assert len(arrivals) == 3
    assert arrivals[0] >= 0.09
    assert arrivals[2] >= 0.29
    assert arrivals[2] < 2.0


async def test_no_delay_by_default(http: aiohttp.ClientSession) -> None:
    provider = make(http)
    assert provider.delay == 0.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    pieces, _ = await run(provider, user(" ".join(["w"] * 200)))
    assert len(pieces) == 200
    assert loop.time() - started < 0.5


def test_rejects_unknown_options(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, dealy=0.1)
    errors = info.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [(("dealy",), "extra_forbidden")]


def test_rejects_negative_delay(http: aiohttp.ClientSession) -> None:
    with pytest.raises(ValidationError) as info:
        make(http, delay=-1)
    assert [e["loc"] for e in info.value.errors()] == [("delay",)]
