"""Shutdown within the grace (core/server.py, core/cutoff.py): `chatbus serve` as a
real process on SIGTERM, its model an openai_compat one on the fake upstream; plus, in process,
what the cut turns owe (unstreamed answers, deliveries left in the outbox)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from standardwebhooks import Webhook

from chatbus.testing.fake_upstream import Behaviour, FakeUpstream
from tests.conftest import StartChatbus, webhook_settings
from tests.test_cli import ROOT, free_port, wait_until_listening
from tests.test_webhooks import FAST, SECRET, Receiver, _pending_in, listening
from tests.waiting import wait_until

GRACE = 3.0
SLACK = 1.0  # what the issue allows past the grace, the process's exit included
FIRST = "first "
SILENT = Behaviour(tokens=[FIRST, "never sent"], delay=60)  # a token, then silence
CUT_SHORT = "chatbus is shutting down; the answer was cut short"


def serve(
    tmp_path: Path, upstream: FakeUpstream, grace: float, callback_host: str = "127.0.0.1:9"
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = tmp_path / "chatbus.toml"
    config.write_text(
        f'default_model = "fake"\n[server]\nport = {port}\naccess_log = false\n'
        f"shutdown_grace_seconds = {grace}\n"
        f'[history.sqlite]\npath = "chat.db"\n'
        f'[plugins.webhooks]\ncallback_hosts = ["{callback_host}"]\n'
        f'[models.fake]\nprovider = "openai_compat"\nbase_url = "{upstream.base_url}"\n'
        'model = "fake-model"\nread_timeout = 30\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHATBUS_CALLBACK_SECRET": SECRET}
    command = [sys.executable, "-m", "core.cli", "--config", str(config), "serve"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return process, port


async def events(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The data of each event of an event stream (OpenAI's `[DONE]` is not JSON)."""
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


@dataclass
class OpenStream:
    """A streamed chat read to its end in the background; `under_way` is set once its first
    token arrived."""

    path: str
    body: dict[str, Any]
    under_way: asyncio.Event = field(default_factory=asyncio.Event)
    status: int = 0
    events: list[str] = field(default_factory=list)

    async def read(self, http: aiohttp.ClientSession, base: str) -> None:
        async with http.post(base + self.path, json={**self.body, "stream": True}) as response:
            self.status = response.status
            async for data in events(response):
                self.events.append(data)
                if FIRST in data:
                    self.under_way.set()

    def frames(self) -> list[Any]:
        return [data if data == "[DONE]" else orjson.loads(data) for data in self.events]


def chatchat_stream(query: str) -> OpenStream:
    return OpenStream("/chat/chat", {"query": query})


def openai_stream(query: str) -> OpenStream:
    return OpenStream("/v1/chat/completions", {"messages": [{"role": "user", "content": query}]})


async def unstreamed(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as response:
        return response.status, await response.json()


def answering(upstream: FakeUpstream, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(upstream.received) == count

    return check


async def slow_upload(port: int) -> asyncio.StreamWriter:
    """A request whose body stops coming: its handler waits, reading, and is no turn."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /chat/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"query": '
    )
    await writer.drain()
    return writer


async def exit_after_sigterm(process: subprocess.Popen[bytes]) -> float:
    """SIGTERM, then the seconds until the process has exited (15 s at most)."""
    return await exit_after(process, signal.SIGTERM)


async def exit_after(process: subprocess.Popen[bytes], sig: signal.Signals) -> float:
    """Send `sig`, then the seconds until the process has exited (15 s at most)."""
    sent = time.monotonic()
    process.send_signal(sig)
    await asyncio.to_thread(process.wait, 15)
    return time.monotonic() - sent


def stored(tmp_path: Path) -> dict[str, tuple[str, str | None, str]]:
    with sqlite3.connect(tmp_path / "chat.db") as db:
        rows = db.execute("SELECT message_id, status, error, response FROM messages")
        return {message_id: (status, error, text) for message_id, status, error, text in rows}


def stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=5)
    return process.stderr.read().decode() if process.stderr else ""


async def test_sigterm_cuts_what_the_grace_did_not_finish_within_grace_plus_one_second(
    tmp_path: Path,
) -> None:
    async with FakeUpstream(SILENT) as upstream, listening(Receiver()) as receiver:
        callback_host = urlsplit(receiver.url).netloc
        process, port = serve(tmp_path, upstream, GRACE, callback_host)
        base = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_until_listening, port, process)  # type: ignore[arg-type]
            async with aiohttp.ClientSession() as http:
                uploading = await slow_upload(port)  # its handler is reading by the SIGTERM
                streams = [chatchat_stream(f"chatchat {i}") for i in range(3)]
                streams += [openai_stream(f"openai {i}") for i in range(2)]
                reading = [asyncio.create_task(s.read(http, base)) for s in streams]
                answers = [
                    asyncio.create_task(unstreamed(http, base + "/chat/chat", {"query": "json"})),
                    asyncio.create_task(
                        unstreamed(
                            http,
                            base + "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "json"}]},
                        )
                    ),
                ]
                body = {"query": "call me back", "callback_url": receiver.url}
                status, accepted = await unstreamed(http, base + "/chat/chat", body)
                assert status == 202
                async with asyncio.timeout(15):
                    for s in streams:
                        await s.under_way.wait()
                await wait_until(answering(upstream, 8), "every turn answering")
                elapsed = await exit_after_sigterm(process)
                async with asyncio.timeout(5):
                    await asyncio.gather(*reading)
                    answered = await asyncio.gather(*answers)
                await receiver.wait_for(1)
                uploading.close()
        finally:
            stderr = stop(process)
    print(f"shutdown time with grace {GRACE:g} s and a silent upstream: {elapsed:.2f} s")
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert GRACE <= elapsed < GRACE + SLACK
    ids = []
    for s in streams[:3]:  # chatchat's shape: the text, the id, chatbus's error, code and msg
        *deltas, last = s.frames()
        assert s.status == 200 and deltas == [{"text": FIRST, "message_id": last["message_id"]}]
        assert last == {
            "text": "",
            "message_id": last["message_id"],
            "error": {"type": "shutting_down", "message": CUT_SHORT},
            "code": 503,
            "msg": CUT_SHORT,
        }
        ids.append(last["message_id"])
    for s in streams[3:]:  # OpenAI's: an error event, then [DONE]
        *chunks, error, done = s.frames()
        assert s.status == 200 and done == "[DONE]"
        assert chunks[-1]["choices"][0]["delta"] == {"content": FIRST}
        assert error == {
            "error": {"message": CUT_SHORT, "type": "api_error", "param": None,
                      "code": "shutting_down"}
        }  # fmt: skip
        ids.append(chunks[0]["id"].removeprefix("chatcmpl-"))
    (chatchat_status, chatchat_json), (openai_status, openai_json) = answered
    assert chatchat_status == openai_status == 503
    assert chatchat_json["error"]["type"] == "shutting_down" and chatchat_json["code"] == 503
    assert chatchat_json["text"] == FIRST
    assert openai_json["error"]["code"] == "shutting_down"
    assert openai_json["chatbus"]["text"] == FIRST
    ids += [chatchat_json["message_id"], openai_json["chatbus"]["message_id"]]
    ids.append(accepted["message_id"])
    turns = stored(tmp_path)
    assert set(turns) == set(ids)
    assert set(turns.values()) == {("cancelled", "shutting_down", FIRST)}
    (headers, raw) = receiver.requests[0]
    payload = Webhook(SECRET).verify(raw, headers)
    assert payload["type"] == "chat.cancelled"
    assert payload["data"]["message_id"] == accepted["message_id"]
    assert payload["data"]["status"] == "cancelled" and payload["data"]["text"] == FIRST


async def test_a_stream_that_finishes_within_the_grace_is_not_cut(tmp_path: Path) -> None:
    tokens = [FIRST, "second ", "third ", "last"]
    async with FakeUpstream(Behaviour(tokens=tokens, delay=0.3)) as upstream:
        grace = 20.0  # far longer than the answer: the process leaves as soon as it is done
        process, port = serve(tmp_path, upstream, grace)
        try:
            await asyncio.to_thread(wait_until_listening, port, process)  # type: ignore[arg-type]
            async with aiohttp.ClientSession() as http:
                stream = chatchat_stream("finish me")
                reading = asyncio.create_task(stream.read(http, f"http://127.0.0.1:{port}"))
                async with asyncio.timeout(15):
                    await stream.under_way.wait()
                elapsed = await exit_after_sigterm(process)
                async with asyncio.timeout(5):
                    await reading
        finally:
            stderr = stop(process)
    assert process.returncode == 0, stderr
    assert elapsed < grace
    frames = stream.frames()
    assert "".join(frame["text"] for frame in frames) == "".join(tokens)
    assert all("error" not in frame for frame in frames)
    ((status, error, text),) = stored(tmp_path).values()
    assert (status, error, text) == ("completed", None, "".join(tokens))


async def test_the_end_of_a_cut_async_chat_waits_in_the_outbox_when_not_delivered_in_time(
    tmp_path: Path,
    start_chatbus: StartChatbus,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream.behaviour = SILENT
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    held = asyncio.Event()
    async with listening(Receiver(gate=held)) as receiver:
        chatbus = await start_chatbus(
            **webhook_settings(callback_hosts=[urlsplit(receiver.url).netloc],
                               callback_secret_env="HOOK_SECRET",
                               delivery={**FAST, "timeout_seconds": 30}),
            server={"shutdown_grace_seconds": 0.2},
        )  # fmt: skip
        body = {"query": "q", "model_name": "fake", "callback_url": receiver.url}
        async with chatbus.post("/chat/chat", body) as response:
            accepted = await response.json()
        await wait_until(answering(upstream, 1), "the turn answering")
        async with asyncio.timeout(0.2 + SLACK + 1):  # a receiver that holds it up is left
            await chatbus.close()
        assert len(receiver.requests) == 1  # tried within the close, not answered in time
        held.set()
    (left,) = await _pending_in(chatbus)
    assert (left.message_id, left.event_type, left.attempts) == (
        accepted["message_id"],
        "chat.cancelled",
        0,
    )
    assert stored(tmp_path) == {accepted["message_id"]: ("cancelled", "shutting_down", FIRST)}


async def test_a_second_ctrl_c_cuts_the_answers_short_at_once(tmp_path: Path) -> None:
    """#16.8: the first Ctrl-C says how many answers are under way and waits for them (the
    grace, a minute here); the second cuts them short now, each stored `cancelled`."""
    async with FakeUpstream(SILENT) as upstream:
        grace = 60.0
        process, port = serve(tmp_path, upstream, grace)
        try:
            await asyncio.to_thread(wait_until_listening, port, process)  # type: ignore[arg-type]
            async with aiohttp.ClientSession() as http:
                stream = chatchat_stream("wait for me")
                reading = asyncio.create_task(stream.read(http, f"http://127.0.0.1:{port}"))
                async with asyncio.timeout(15):
                    await stream.under_way.wait()
                process.send_signal(signal.SIGINT)
                await wait_until(lambda: not accepting(port), "the listener closed", timeout=15)
                elapsed = await exit_after(process, signal.SIGINT)
                async with asyncio.timeout(5):
                    await reading
        finally:
            stderr = stop(process)
    assert process.returncode == 0, stderr
    assert elapsed < grace / 2  # far from the grace: not a timing, a forced stop
    lines = {line["event"]: line for line in map(orjson.loads, stderr.splitlines())}
    assert lines["stopping"]["answers_in_flight"] == 1
    assert "Ctrl-C again" in lines["stopping"]["hint"]
    assert lines["stopping now"]["answers_cut"] == 1
    assert stream.frames()[-1]["error"]["type"] == "shutting_down"
    ((status, error, text),) = stored(tmp_path).values()
    assert (status, error, text) == ("cancelled", "shutting_down", FIRST)


def accepting(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
