"""kill -9 in the middle of answers, then a restart on the same store: every turn that was
running ends `interrupted`, keeps the answer up to its last checkpoint, and its end event
goes out, so the async chats' callbacks arrive. chatbus runs as a real process; the
upstream and the callback receiver are real servers in the test, all on loopback."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from chatbus.testing.fake_upstream import FakeUpstream
from core.history import Status
from plugins.history_sqlite.store import SqliteStore
from tests.test_cli import CHATBUS, ROOT, free_port, wait_until_listening
from tests.waiting import wait_until

ASYNC_CHATS = 15
SECRET = "whsec_" + base64.b64encode(b"chatbus-crash-test-secret-012345").decode()
CONFIG = """\
default_model = "slow"
[chat]
checkpoint_seconds = 0.2
[history]
lease_seconds = 2           # the killed instance's turns are ended 2 s after its last beat
heartbeat_seconds = 0.5
[history.sqlite]
path = "crash.db"
[plugins.webhooks]
callback_hosts = ["127.0.0.1:{receiver_port}"]
[plugins.webhooks.delivery]
poll_seconds = 0.05
schedule = [0.1, 0.1, 0.1]
[models.slow]
provider = "openai_compat"
base_url = "{upstream}"
model = "fake-model"
"""


class Receiver:
    """The callback URL: a real aiohttp server keeping every body it got."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/cb", self.callback)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def callback(self, request: web.Request) -> web.Response:
        self.bodies.append(orjson.loads(await request.read()))
        self.arrived.set()
        return web.Response()

    async def wait_for(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while len(self.bodies) < count:
                self.arrived.clear()
                await self.arrived.wait()


def serve(config: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "CHATBUS_CALLBACK_SECRET": SECRET}
    command = [*CHATBUS, "--config", str(config), "serve", "--port", str(port)]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_until_listening(port, process)
    return process


async def checkpointed(path: Path, message_id: str, seen: str) -> None:
    """Wait until a checkpoint stored past what the client has read: the kill finds it."""
    store = SqliteStore(str(path))
    await store.open()

    async def past_what_was_read() -> bool:
        record = await store.get_message("default", message_id)
        return record is not None and len(record.response) >= len(seen)

    try:
        await wait_until(past_what_was_read, "a checkpoint past what was read", timeout=10)
    finally:
        await store.close()


async def test_kill_9_mid_answer_then_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.behaviour.tokens = [f"t{i} " for i in range(400)]
    upstream.behaviour.delay = 0.05  # 20 s an answer: every one is running at the kill
    receiver = Receiver()
    await receiver.start()
    config = tmp_path / "crash.toml"
    config.write_text(CONFIG.format(receiver_port=receiver.port, upstream=upstream.base_url))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = serve(config, port)
    seen = ""
    try:
        async with aiohttp.ClientSession() as http:
            callback = f"http://127.0.0.1:{receiver.port}/cb"
            for _ in range(ASYNC_CHATS):
                body = {"query": "go", "callback_url": callback}
                async with http.post(url + "/chat/chat", json=body) as response:
                    assert response.status == 202
            async with http.post(url + "/chat/chat", json={"query": "go", "stream": True}) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        frame = orjson.loads(line[6:])
                        seen += frame["text"]
                        if len(seen) > 60:  # a second of answer: checkpoints have been made
                            break
                await checkpointed(tmp_path / "crash.db", frame["message_id"], seen)
                first.send_signal(signal.SIGKILL)
                first.wait(10)
        assert receiver.bodies == []  # nothing ended before the kill
        second = serve(config, port)
        try:
            await receiver.wait_for(ASYNC_CHATS, timeout=20)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(15)
    finally:
        if first.poll() is None:
            first.kill()
        await receiver.runner.cleanup()  # type: ignore[union-attr]

    kinds = {(body["type"], body["data"]["error_type"]) for body in receiver.bodies}
    assert kinds == {("chat.failed", "interrupted")}
    assert len({body["data"]["message_id"] for body in receiver.bodies}) == ASYNC_CHATS
    assert all(body["data"]["text"].startswith("t0 t1 ") for body in receiver.bodies)
    store = SqliteStore(str(tmp_path / "crash.db"))
    await store.open()
    try:
        streamed = await store.get_message("default", frame["message_id"])
    finally:
        await store.close()
    assert streamed is not None
    assert (streamed.status, streamed.error) == (Status.INTERRUPTED, "interrupted")
    assert len(streamed.response) > len("t0 t1 ")
    assert seen.startswith(streamed.response) or streamed.response.startswith(seen)
