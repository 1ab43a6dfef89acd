"""chatbus as real processes for the crash tests (kill -9, several instances on one store),
and the receiver of their webhooks: a real aiohttp server keeping every delivery it got."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.test_cli import CHATBUS, ROOT, free_port
from tests.waiting import wait_until_blocking

SECRET = "whsec_" + base64.b64encode(b"chatbus-crash-test-secret-012345").decode()
SECRET_ENV = "CHATBUS_CALLBACK_SECRET"  # signs callbacks and the webhook endpoints alike here


class Receiver:
    """Webhooks and callbacks land on POST /cb; each body is kept with its `webhook-id`."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.webhook_ids: list[str] = []
        self.arrived = asyncio.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/cb"
        self.runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/cb", self.callback)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def callback(self, request: web.Request) -> web.Response:
        self.bodies.append(orjson.loads(await request.read()))
        self.webhook_ids.append(request.headers["webhook-id"])
        self.arrived.set()
        return web.Response()

    async def wait_for(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while len(self.bodies) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def message_ids(self, event_type: str) -> set[str]:
        return {body["data"]["message_id"] for body in self.bodies if body["type"] == event_type}

    def duplicates(self) -> int:
        """Deliveries received more than once (the same webhook-id): at-least-once's cost."""
        return sum(count - 1 for count in Counter(self.webhook_ids).values())


class ChatbusProcess:
    """`chatbus serve` on its own port, its log in a file beside its config."""

    def __init__(
        self,
        config: Path,
        port: int | None = None,
        *args: str,
        log_level: str = "warning",
        own_session: bool = False,
    ) -> None:
        self.config = config
        self.port = port or free_port()
        self.args = args  # more for `serve` (--workers 2)
        self.log_level = log_level
        self.own_session = own_session  # its process group its own, as a terminal's job
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config.with_name(f"{config.stem}-{self.port}.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChatbusProcess:
        env = {**os.environ, SECRET_ENV: SECRET}
        command = [*CHATBUS, "--config", str(self.config), "--log-level", self.log_level]
        command += ["serve", "--port", str(self.port), *self.args]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=self.own_session,
            )  # fmt: skip
        wait_until_blocking(self._listening, "chatbus serve listening", timeout=15)
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON lines of its log so far (stderr is no terminal); the others, and a line
        still being written, left out."""
        lines = []
        for text in self.log.read_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                lines.append(orjson.loads(text))
        return lines

    def kill(self) -> None:
        """kill -9: nothing of the process's own runs after it."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        if self.process is not None:
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
