"""The `chatbus` command (core/cli/) and the README's quick start, as a user runs them."""

from __future__ import annotations

import asyncio
import errno
import json
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

from chatbus.testing.fake_upstream import DEFAULT_TOKENS, FakeUpstream
from core.cli.serving import start_problem
from tests.waiting import wait_until_blocking

ROOT = Path(__file__).parents[1]
CHATBUS = [sys.executable, "-m", "core.cli"]
DEFAULT_ANSWER = "".join(DEFAULT_TOKENS)


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "chatbus.toml"
    config.write_text(
        'default_model = "echo"\n[models.echo]\nprovider = "echo"\n'
        '[history.sqlite]\npath = "cli.db"\n'
    )
    return config


def run(*args: str, cwd: Path = ROOT, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHATBUS, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


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
        assert '"history_len"' in command  # the first example remembers (#16.4)
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
    empty = run("--config", str(config), "webhooks", "list")  # creates the store
    assert (empty.returncode, empty.stdout) == (0, "")
    assert empty.stderr == "no deliveries in the outbox\n"
    with sqlite3.connect(db) as connection:
        connection.execute(
            "INSERT INTO outbox VALUES ('msg_1', 'http://127.0.0.1:1/h', 'chat.completed', '{}',"
            " 'S', 'm1', 'dead', 6, 0, 'HTTP 500', 0, NULL, NULL)"
        )
    listed = run("--config", str(config), "webhooks", "list", "--status", "dead")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "ATTEMPTS", "EVENT", "URL", "NEXT", "ATTEMPT",
                              "LAST", "ERROR"]  # fmt: skip
    assert row.split()[:4] == ["msg_1", "dead", "6", "chat.completed"]
    assert row.index("dead") == header.index("STATUS")  # aligned under its header
    assert row.endswith("HTTP 500")
    again = run("--config", str(config), "webhooks", "redeliver", "msg_1")
    assert (again.returncode, again.stdout) == (0, "msg_1: pending, due now\n")
    no_dead = run("--config", str(config), "webhooks", "list", "--status", "dead")
    assert (no_dead.stdout, no_dead.stderr) == ("", "no dead deliveries in the outbox\n")
    assert "msg_1  pending" in run("--config", str(config), "webhooks", "list").stdout
    missing = run("--config", str(config), "webhooks", "redeliver", "nope")
    assert (missing.returncode, missing.stderr) == (1, "chatbus: no delivery 'nope'\n")


# --- the commands as a newcomer types them (#16.1) ------------------------------------------


def test_config_is_read_before_or_after_the_command(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for args in (
        ["--config", str(config), "chat", "one"],
        ["chat", "two", "--config", str(config)],
    ):
        result = run(*args, cwd=tmp_path / "..")
        assert result.returncode == 0, result.stderr
    listed = run("conversations", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[-1] for line in listed.stdout.splitlines()[1:]] == ["two", "one"]
    nested = run("webhooks", "list", "--config", str(config), "--log-level", "warning")
    assert nested.returncode == 0, nested.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"chatbus \d+\.\d+\.\d+\S*\n", result.stdout)


def test_chat_reads_the_question_from_stdin(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run("--config", str(config), "chat", "-", stdin="a question\nover two lines\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "a question\nover two lines\n"


def test_models_lists_the_configured_models(tmp_path: Path) -> None:
    config = tmp_path / "chatbus.toml"
    config.write_text(
        'default_model = "vllm"\n[models.echo]\nprovider = "echo"\n'
        '[models.vllm]\nprovider = "openai_compat"\nbase_url = "http://127.0.0.1:9/v1"\n'
        'model = "Qwen2.5-7B-Instruct"\nfallbacks = ["echo"]\n'
    )
    result = run("--config", str(config), "models")
    assert result.returncode == 0, result.stderr
    assert [line.split() for line in result.stdout.splitlines()] == [
        ["NAME", "PROVIDER", "UPSTREAM", "MODEL", "FALLBACKS"],
        ["echo", "echo"],
        ["vllm", "(default)", "openai_compat", "Qwen2.5-7B-Instruct", "echo"],
    ]


def test_conversations_and_one_conversations_turns(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    empty = run("--config", str(config), "conversations")
    assert (empty.returncode, empty.stdout, empty.stderr) == (
        0, "", "no conversations (tenant default)\n"
    )  # fmt: skip
    first = run("--config", str(config), "chat", "the first question")
    conversation = re.search(r"conversation (\w+)", first.stderr).group(1)  # type: ignore[union-attr]
    run("--config", str(config), "chat", "a second one", "--conversation", conversation)
    listed = run("--config", str(config), "conversations")
    header, row = listed.stdout.splitlines()
    assert header.split() == ["ID", "TURNS", "UPDATED", "FIRST", "QUESTION"]
    assert row.startswith(f"{conversation}  2  ") and row.endswith("the first question")
    shown = run("--config", str(config), "conversations", conversation)
    assert shown.returncode == 0, shown.stderr
    turns = shown.stdout.split("\n\n")
    assert turns[0].endswith("echo  completed]\n> the first question\nthe first question")
    assert turns[1].endswith("echo  completed]\n> a second one\na second one")
    missing = run("--config", str(config), "conversations", "nope")
    assert (missing.returncode, missing.stderr) == (1, "chatbus: no conversation 'nope'\n")


async def run_async(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """`run` in a loop that keeps serving (the fake upstream the command calls)."""
    process = await asyncio.create_subprocess_exec(
        *CHATBUS, *args, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate(stdin.encode())
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def upstream_config(tmp_path: Path, upstream: FakeUpstream) -> Path:
    config = tmp_path / "chatbus.toml"
    config.write_text(
        'default_model = "fake"\n[history.sqlite]\npath = "cli.db"\n'
        '[prompts]\ndefault = "{{ input }}"\npy = "Code: {{ input }}"\n'
        f'[models.fake]\nprovider = "openai_compat"\nbase_url = "{upstream.base_url}"\n'
        'model = "fake-model"\n'
    )
    return config


async def test_chat_with_no_question_is_a_session_that_remembers(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = upstream_config(tmp_path, upstream)
    code, out, err = await run_async(
        "chat", "--config", str(config), "--system", "Be brief.", "--temperature", "0.2",
        "--prompt-name", "py", stdin="first question\n\nsecond question\n",
    )  # fmt: skip
    assert code == 0, err
    assert out.count(DEFAULT_ANSWER) == 2
    assert "Chatting with fake" in err and "Ctrl-D" in err
    first, second = (request.body for request in upstream.received)
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Code: first question"},
    ]
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},  # the stored turn: the query as asked
        {"role": "assistant", "content": DEFAULT_ANSWER},
        {"role": "user", "content": "Code: second question"},
    ]
    assert first["temperature"] == second["temperature"] == 0.2


async def test_a_session_ends_at_exit(tmp_path: Path, upstream: FakeUpstream) -> None:
    config = upstream_config(tmp_path, upstream)
    code, _, err = await run_async("--config", str(config), "chat", stdin="hi\nexit\nnot asked\n")
    assert code == 0, err
    assert [r.body["messages"][-1]["content"] for r in upstream.received] == ["hi"]


# --- failures a newcomer meets: visible, in one line (#16.2, #16.7) --------------------------


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("--config", str(config), "serve", "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"chatbus: port {port} is in use: set --port or CHATBUS_SERVER__PORT"
    )


def test_the_chatchat_port_is_named_when_it_is_in_use() -> None:
    in_use = OSError(errno.EADDRINUSE, "address already in use")
    assert start_problem(in_use, "127.0.0.1", 7861) == (
        "port 7861 is in use (Langchain-Chatchat's API port): set --port or CHATBUS_SERVER__PORT"
    )
    unknown_host = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert start_problem(unknown_host, "nowhere.invalid", 80) == (
        "cannot listen on nowhere.invalid:80: Name or service not known"
        " (set --host or CHATBUS_SERVER__HOST)"
    )


def test_chat_says_which_model_answered_and_why_the_first_failed(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = tmp_path / "chatbus.toml"
    config.write_text(
        'default_model = "dead"\n[history.sqlite]\npath = "cli.db"\n'
        f'[models.dead]\nprovider = "openai_compat"\nbase_url = "{dead}"\nmodel = "m"\n'
        'retries = 1\nretry_backoff = 0\nfallbacks = ["echo"]\n[models.echo]\nprovider = "echo"\n'
    )
    result = run("--config", str(config), "chat", "still answered")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "still answered\n"
    note = result.stderr.splitlines()[-2]
    assert note.startswith(f"[dead: cannot connect to {dead}: ")
    assert note.endswith(" (2 attempts); answered by echo]")  # the attempt and its retry
    alone = run("--config", str(config), "chat", "no fallback", "--model", "dead")
    assert alone.returncode == 0  # dead falls back to echo whichever is asked
    config.write_text(config.read_text().replace('fallbacks = ["echo"]', ""))
    failed = run("--config", str(config), "chat", "nobody answers")
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1].startswith(
        f"chatbus: upstream_unavailable: dead: cannot connect to {dead}"
    )


def test_serve_with_no_config_file_says_so_when_ready(tmp_path: Path) -> None:
    """#16.6: the ready line names the configuration read, or that there was none."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "CHATBUS_CONFIG"}
    env["CHATBUS_SERVER__PORT"] = str(port)
    process = subprocess.Popen(
        [*CHATBUS, "serve"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until_listening(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    ready = next(line for line in map(json.loads, stderr.splitlines()) if line["event"] == "ready")
    assert ready["config"] == f"built-in defaults (no config.toml in {tmp_path})"
    assert ready["url"] == f"http://127.0.0.1:{port}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_installs_what_serving_needs_and_make_test_the_rest(tmp_path: Path) -> None:
    """#16.8, from a fresh clone (a dry run: what make would do, nothing installed)."""
    (tmp_path / "pyproject.toml").touch()
    (tmp_path / "examples/chatbus-provider-example").mkdir(parents=True)
    (tmp_path / "examples/chatbus-provider-example/pyproject.toml").touch()

    def planned(target: str) -> list[str]:
        done = subprocess.run(
            ["make", "-n", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), target],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        lines = done.stdout.splitlines()
        return [line for line in lines if "pip install" in line or "echo" in line]

    serve = planned("serve")
    assert [line for line in serve if "pip install" in line] == [
        ".venv/bin/python -m pip install --quiet -e ."
    ]
    assert any("creating .venv" in line for line in serve)
    assert any("about a minute" in line for line in serve)
    test = [line for line in planned("test") if "pip install" in line]
    assert test == [
        ".venv/bin/python -m pip install --quiet -e .",
        ".venv/bin/python -m pip install --quiet -e '.[test]' -e examples/chatbus-provider-example",
    ]
