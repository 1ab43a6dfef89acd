"""The `chatbus` command (core/cli.py) and the README's quick start, as a user runs them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.waiting import wait_until_blocking

ROOT = Path(__file__).parents[1]
CHATBUS = [sys.executable, "-m", "core.cli"]


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "chatbus.toml"
    config.write_text(
        'default_model = "echo"\n[models.echo]\nprovider = "echo"\n'
        '[history.sqlite]\npath = "cli.db"\n'
    )
    return config


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHATBUS, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


def test_chat_streams_the_answer_to_the_terminal(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run("--config", str(config), "chat", "Hello {{ you }}, terminal")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello {{ you }}, terminal\n"
    conversation = re.search(r"conversation (\w+)", result.stderr).group(1)  # type: ignore[union-attr]
    again = run("--config", str(config), "chat", "second", "--conversation", conversation)
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(tmp_path / "cli.db") as db:
        rows = db.execute("SELECT conversation_id, query, status FROM messages ORDER BY seq")
        assert rows.fetchall() == [
            (conversation, "Hello {{ you }}, terminal", "completed"),
            (conversation, "second", "completed"),
        ]


def test_chat_with_an_unknown_model(tmp_path: Path) -> None:
    result = run("--config", str(write_config(tmp_path)), "chat", "hi", "--model", "nope")
    assert result.returncode == 2
    assert result.stderr.strip() == "chatbus: model_name: unknown model 'nope' (configured: echo)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def readme_curl() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^curl -N .*?(?<!\\)$", readme, flags=re.M | re.S)
    assert match, "the README shows no curl -N command"
    return match.group(0)


def wait_until_listening(port: int, process: subprocess.Popen[str]) -> None:
    def listening() -> bool:
        assert process.poll() is None, process.communicate()[1]
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until_blocking(listening, "chatbus serve listening", timeout=15)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_serve_then_the_readme_curl_streams_an_answer(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "CHATBUS_HISTORY__SQLITE__PATH": str(tmp_path / "serve.db")}
    process = subprocess.Popen(
        [*CHATBUS, "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until_listening(port, process)
        command = readme_curl().replace("7861", str(port))
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=30, check=True
        )
        frames = [line for line in result.stdout.splitlines() if line]
        assert frames[0].startswith('data: {"text":"Hello, ","message_id":"')
        assert frames[-1].startswith('data: {"text":"chatbus!","message_id":"')
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr
    assert '"event": "stopped"' in stderr or "stopped" in stderr
    assert "Traceback" not in stderr


def test_webhooks_list_and_redeliver(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    db = tmp_path / "cli.db"
    assert run("--config", str(config), "webhooks", "list").stdout == ""  # creates the store
    with sqlite3.connect(db) as connection:
        connection.execute(
            "INSERT INTO outbox VALUES ('msg_1', 'http://127.0.0.1:1/h', 'chat.completed', '{}',"
            " 'S', 'm1', 'dead', 6, 0, 'HTTP 500', 0, NULL, NULL)"
        )
    listed = run("--config", str(config), "webhooks", "list", "--status", "dead")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("msg_1  dead       attempts=6  chat.completed")
    assert listed.stdout.rstrip().endswith("HTTP 500")
    again = run("--config", str(config), "webhooks", "redeliver", "msg_1")
    assert (again.returncode, again.stdout) == (0, "msg_1: pending, due now\n")
    assert run("--config", str(config), "webhooks", "list", "--status", "dead").stdout == ""
    assert "msg_1  pending" in run("--config", str(config), "webhooks", "list").stdout
    missing = run("--config", str(config), "webhooks", "redeliver", "nope")
    assert (missing.returncode, missing.stderr) == (1, "chatbus: no delivery 'nope'\n")
