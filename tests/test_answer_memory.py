"""chatbus as a real process against an endless upstream process: with the default limits the
answer ends `answer_too_long`, and chatbus's memory stays bounded while it streams."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from core.config import DEFAULT_ANSWER_CHARS
from tests.test_cli import ROOT, free_port, wait_until_listening
from tests.waiting import wait_until_blocking

RSS_LIMIT_KB = 200 * 1024


def memory_kb(pid: int, field: str) -> int:
    """`VmRSS` (now) or `VmHWM` (the peak so far) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(
    params=[["--token-count", "1000"], ["--token-chars", "1"]], ids=["tok-pieces", "1-char-pieces"]
)
def endless_upstream(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """`python -m chatbus.testing.fake_upstream --endless`, as fast as it is read: pieces "tok0 " to
    "tok999 " over and over, or pieces of one character (the most pieces an answer can hold,
    each a Python object)."""
    ready = tmp_path / "upstream-url"
    command = [sys.executable, "-m", "chatbus.testing.fake_upstream", "--port", "0", "--endless"]
    command += [*request.param, "--ready-file", str(ready)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:

        def started() -> bool:
            assert process.poll() is None, "the fake upstream exited"
            return ready.exists()

        wait_until_blocking(started, "the fake upstream started", timeout=15)
        yield ready.read_text()
    finally:
        stop(process)


def serve(tmp_path: Path, base_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = tmp_path / "chatbus.toml"
    config.write_text(
        f'default_model = "endless"\n[server]\nport = {port}\naccess_log = false\n'
        f'[history.sqlite]\npath = "chat.db"\n'
        f'[models.endless]\nprovider = "openai_compat"\nbase_url = "{base_url}"\n'
        'model = "fake-model"\nread_timeout = 10\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "core.cli", "--config", str(config), "serve"]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    return process, port


async def test_an_endless_answer_ends_at_the_default_limit_in_bounded_memory(
    tmp_path: Path, endless_upstream: str
) -> None:
    process, port = serve(tmp_path, endless_upstream)
    try:
        wait_until_listening(port, process)  # type: ignore[arg-type]
        highest = 0
        received = 0
        tail = b""
        async with asyncio.timeout(30), aiohttp.ClientSession() as http:
            body = {"query": "go on forever", "stream": True}
            async with http.post(f"http://127.0.0.1:{port}/chat/chat", json=body) as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    received += len(chunk)
                    tail = (tail + chunk)[-4096:]
                    highest = max(highest, memory_kb(process.pid, "VmRSS"))
        peak = memory_kb(process.pid, "VmHWM")
    finally:
        stop(process)
        stderr = process.stderr.read().decode() if process.stderr else ""
    assert "Traceback" not in stderr
    last = orjson.loads(tail.rstrip(b"\r\n").rsplit(b"\r\n\r\n", 1)[-1].removeprefix(b"data: "))
    assert last["error"]["type"] == "answer_too_long"
    assert received > DEFAULT_ANSWER_CHARS  # the whole answer came, framed
    print(f"chatbus RSS while streaming: {highest / 1024:.0f} MB, peak {peak / 1024:.0f} MB")
    assert highest < RSS_LIMIT_KB
    assert peak < RSS_LIMIT_KB
    with sqlite3.connect(tmp_path / "chat.db") as db:
        ((status, error, length),) = db.execute(
            "SELECT status, error, length(response) FROM messages"
        ).fetchall()
    assert (status, error) == ("failed", "answer_too_long")
    assert DEFAULT_ANSWER_CHARS - 10 < length <= DEFAULT_ANSWER_CHARS
