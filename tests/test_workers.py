"""`chatbus serve --workers N` (core/cli/workers.py): real supervisors and their forked
workers on one port, on the fake upstream; SQLite and the MongoDB-compatible server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from chatbus.testing.fake_upstream import DEFAULT_TOKENS, Behaviour, FakeUpstream
from core.cli.running import opened_store
from core.cli.workers import QUICK_DEATHS, reuse_port_problem
from core.config_sources import load_config
from core.history import Status
from tests.mongo_server import MongoDatabase
from tests.processes import SECRET_ENV, ChatbusProcess, Receiver
from tests.test_cli import free_port, run
from tests.waiting import wait_until

CONFIG = """\
default_model = "fake"
[server]
shutdown_grace_seconds = {grace}
{workers}
[history]
backend = "{backend}"
[history.sqlite]
path = "workers.db"
[history.mongo]
uri = "{mongo_uri}"
database = "{mongo_database}"
[[plugins.webhooks.endpoints]]
url = "{receiver}"
secret_env = "{secret_env}"
events = ["chat_completed"]
[plugins.webhooks.delivery]
poll_seconds = 0.05
[models.fake]
provider = "openai_compat"
base_url = "{upstream}"
model = "fake-model"
read_timeout = 30
retries = 0
"""
CONVERSATIONS = 50  # clients at once, each a conversation of TURNS turns one after another
TURNS = 6
FIRST = "first "


def write_config(
    tmp_path: Path,
    upstream: FakeUpstream,
    receiver: str = "http://127.0.0.1:9/cb",
    mongodb: MongoDatabase | None = None,
    grace: float = 5.0,
    workers: str = "",
) -> Path:
    config = tmp_path / "workers.toml"
    config.write_text(
        CONFIG.format(
            grace=grace,
            workers=workers,
            backend="mongo" if mongodb else "sqlite",
            mongo_uri=mongodb.uri if mongodb else "",
            mongo_database=mongodb.name if mongodb else "",
            receiver=receiver,
            secret_env=SECRET_ENV,
            upstream=upstream.base_url,
        )
    )
    return config


def events(chatbus: ChatbusProcess, name: str) -> list[dict[str, Any]]:
    return [line for line in chatbus.log_lines() if line.get("event") == name]


async def ready(chatbus: ChatbusProcess) -> dict[int, int]:
    """Once the supervisor says "ready": each worker's pid, by index."""
    await wait_until(lambda: events(chatbus, "ready"), "the ready line", timeout=30)
    return pids(chatbus)


def pids(chatbus: ChatbusProcess) -> dict[int, int]:
    """The pid each worker last said it was ready with, by index."""
    return {line["worker"]: line["pid"] for line in events(chatbus, "worker ready")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_worker(chatbus: ChatbusProcess, pid: int) -> bool:
    """kill -9 a worker of this supervisor, never another process that got its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, parent = stat.rsplit(")", 1)[1].split()[:2]
    if int(parent) != supervisor(chatbus).pid or state == "Z":
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def supervisor(chatbus: ChatbusProcess) -> subprocess.Popen[bytes]:
    assert chatbus.process is not None
    return chatbus.process


async def chat(http: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    async with http.post(url + "/chat/chat", json={"stream": False, **body}) as response:
        assert response.status == 200, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


def new_connections() -> aiohttp.ClientSession:
    """A connection a request: the kernel spreads connections, not requests, over workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))


async def test_workers_serve_one_port_and_say_ready_once_all_are(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    chatbus = ChatbusProcess(write_config(tmp_path, upstream), None, "--workers", "2",
                             log_level="info")  # fmt: skip
    chatbus.start()
    chatbus_pid = supervisor(chatbus).pid
    try:
        workers = await ready(chatbus)
        async with new_connections() as http:
            answer = await chat(http, chatbus.url, query="hello")
    finally:
        chatbus.stop()
    assert answer["text"] == "".join(DEFAULT_TOKENS)
    assert sorted(workers) == [0, 1]
    assert len(set(workers.values())) == 2 and chatbus_pid not in workers.values()
    lines = chatbus.log_lines()
    names = [line["event"] for line in lines]
    (said,) = (line for line in lines if line["event"] == "ready")
    assert said["workers"] == 2 and said["url"] == chatbus.url
    assert names.index("ready") > max(i for i, n in enumerate(names) if n == "worker ready")
    # Every line a worker logs says which; the supervisor's do not.
    own = [line for line in lines if "pid" in line and line["event"] != "workers ready"]
    assert {(line["worker"], line["pid"]) for line in own} == set(workers.items())
    assert names.count("stopped") == 2 and names[-1] == "workers stopped"


async def test_sigterm_stops_every_worker_and_the_answer_in_flight_completes(
    tmp_path: Path,
) -> None:
    tokens = [FIRST, "second ", "third ", "last"]
    async with FakeUpstream(Behaviour(tokens=tokens, delay=0.3)) as upstream:
        config = write_config(tmp_path, upstream, grace=20, workers="workers = 2")
        chatbus = ChatbusProcess(config, log_level="info")  # [server] workers, no option
        chatbus.start()
        try:
            workers = await ready(chatbus)
            async with aiohttp.ClientSession() as http:
                request = {"query": "finish me", "stream": True}
                async with http.post(chatbus.url + "/chat/chat", json=request) as response:
                    first = await response.content.readline()  # the first token's frame
                    sent = time.monotonic()
                    supervisor(chatbus).send_signal(signal.SIGTERM)
                    rest = await response.content.read()
            code = await asyncio.to_thread(supervisor(chatbus).wait, 30)
            stopped_in = time.monotonic() - sent
        finally:
            chatbus.stop()
    assert code == 0
    assert stopped_in < 20  # the grace: it left once the answer was done
    text = (first + rest).decode()
    assert all(token in text for token in tokens) and "error" not in text
    assert not any(alive(pid) for pid in workers.values())
    stopped = {line["worker"] for line in events(chatbus, "stopped")}
    assert stopped == {0, 1}  # each stopped as one process does, not killed
    async with opened_store(load_config(config)) as store:
        turns = await store.messages("default", "", 10, 0)
    assert [(t.status, t.response) for t in turns] == [(Status.COMPLETED, "".join(tokens))]


async def test_a_second_ctrl_c_reaches_every_worker_once_and_cuts_the_answers_short(
    tmp_path: Path,
) -> None:
    """A terminal's Ctrl-C goes to its foreground process group; the workers are out of
    it, so each Ctrl-C reaches them once, through the supervisor: the first waits for the
    answers, the second cuts them short."""
    silent = Behaviour(tokens=[FIRST, "never sent"], delay=60)
    async with FakeUpstream(silent) as upstream:
        config = write_config(tmp_path, upstream, grace=60)
        chatbus = ChatbusProcess(config, None, "--workers", "2", log_level="info",
                                 own_session=True)  # fmt: skip
        chatbus.start()
        try:
            await ready(chatbus)
            group = os.getpgid(supervisor(chatbus).pid)
            async with aiohttp.ClientSession() as http:
                request = {"query": "wait for me", "stream": True}
                async with http.post(chatbus.url + "/chat/chat", json=request) as response:
                    await response.content.readline()  # the first token's frame
                    os.killpg(group, signal.SIGINT)  # Ctrl-C
                    await wait_until(lambda: len(events(chatbus, "stopping")) == 2,
                                     "both workers stopping", timeout=15)  # fmt: skip
                    assert not events(chatbus, "stopping now")  # the grace goes on
                    assert supervisor(chatbus).poll() is None  # waiting for the answer
                    os.killpg(group, signal.SIGINT)  # Ctrl-C again
                    rest = (await response.content.read()).decode()
            code = await asyncio.to_thread(supervisor(chatbus).wait, 15)  # far below the grace
        finally:
            chatbus.stop()
    assert code == 0
    assert "shutting_down" in rest
    (cut,) = events(chatbus, "stopping now")  # the worker answering; the other had none
    assert cut["answers_cut"] == 1
    async with opened_store(load_config(config)) as store:
        (turn,) = await store.messages("default", "", 10, 0)
    assert (turn.status, turn.error, turn.response) == (Status.CANCELLED, "shutting_down", FIRST)


async def test_a_worker_killed_is_restarted_and_one_that_keeps_dying_stops_them_all(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    chatbus = ChatbusProcess(write_config(tmp_path, upstream), None, "--workers", "2",
                             log_level="info")  # fmt: skip
    chatbus.start()
    try:
        first = await ready(chatbus)
        assert kill_worker(chatbus, first[1])
        await wait_until(lambda: pids(chatbus)[1] != first[1], "worker 1 back", timeout=30)
        (died,) = events(chatbus, "worker died")
        assert (died["worker"], died["pid"], died["signal"]) == (1, first[1], "SIGKILL")
        assert not alive(first[1]) and alive(pids(chatbus)[1]) and alive(first[0])
        async with new_connections() as http:
            for _ in range(10):
                await chat(http, chatbus.url, query="still here")

        # Killed again and again as soon as it is started: the supervisor gives up.
        killed: set[int] = set()

        def kill_each_new_worker_1() -> bool:
            for line in events(chatbus, "worker restarted"):
                if line["pid"] not in killed and kill_worker(chatbus, line["pid"]):
                    killed.add(line["pid"])
            return supervisor(chatbus).poll() is not None

        await wait_until(kill_each_new_worker_1, "the supervisor giving up", timeout=60)
        code = supervisor(chatbus).returncode
    finally:
        chatbus.stop()
    assert code == 1
    lines = chatbus.log_lines()
    (gave_up,) = events(chatbus, "worker keeps dying at start-up")
    assert gave_up["worker"] == 1 and gave_up["deaths"] == QUICK_DEATHS
    assert lines[-1] == {**lines[-1], "event": "workers stopped", "exit_code": 1}
    assert not alive(first[0])  # worker 0 was stopped, gracefully
    assert [line["worker"] for line in lines if line["event"] == "stopped"] == [0]


async def test_a_supervisor_killed_takes_its_workers_along(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    chatbus = ChatbusProcess(write_config(tmp_path, upstream), None, "--workers", "2",
                             log_level="info")  # fmt: skip
    chatbus.start()
    try:
        workers = await ready(chatbus)
        chatbus.kill()  # kill -9: nothing of the supervisor's own runs after it
        await wait_until(lambda: not any(map(running, workers.values())), "workers gone", 30)
    finally:
        chatbus.stop()
    assert {line["worker"] for line in events(chatbus, "stopped")} == {0, 1}  # gracefully


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whoever adopted it, if anyone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_the_turn_of_a_worker_killed_mid_answer_is_ended_interrupted_by_a_live_one(
    tmp_path: Path,
) -> None:
    """Each worker holds an instance lease: a worker killed -9 leaves its turn `streaming`
    until its lease expires, then a live worker (the other, or its replacement) ends it
    `interrupted`."""
    silent = Behaviour(tokens=[FIRST, "never sent"], delay=60)
    async with FakeUpstream(silent) as upstream:
        config = write_config(tmp_path, upstream)
        config.write_text(
            config.read_text().replace(
                "[history]\n", "[history]\nlease_seconds = 2\nheartbeat_seconds = 0.5\n"
            )
        )
        chatbus = ChatbusProcess(config, None, "--workers", "2", log_level="info")
        chatbus.start()
        try:
            workers = await ready(chatbus)
            async with (
                aiohttp.ClientSession() as http,
                opened_store(load_config(config)) as store,
                http.post(
                    chatbus.url + "/chat/chat", json={"query": "q", "stream": True}
                ) as response,
            ):
                await response.content.readline()  # the first token: the turn is stored
                (turn,) = await store.messages("default", "", 10, 0)
                answering = int(turn.instance_id.split(":")[1])
                assert kill_worker(chatbus, answering)

                async def ended() -> Status | None:
                    (now,) = await store.messages("default", "", 10, 0)
                    return now.status if now.status is not Status.STREAMING else None

                status = await wait_until(ended, "the turn ended", timeout=30)
        finally:
            chatbus.stop()
    assert answering in workers.values()
    assert status is Status.INTERRUPTED


def test_the_workers_option_and_what_stops_it_before_any_worker_starts(tmp_path: Path) -> None:
    assert "--workers N" in run("serve", "--help").stdout
    zero = run("serve", "--workers", "0")
    assert zero.returncode == 2 and "--workers: must be 1 or more, not 0" in zero.stderr
    config = tmp_path / "c.toml"
    config.write_text('[history]\nbackend = "nowhere"\n')
    port = free_port()
    bad = run("--config", str(config), "serve", "--port", str(port), "--workers", "3")
    assert bad.returncode == 2
    # The first worker starts alone: a problem it finds is said once, not by every worker.
    problems = [line for line in bad.stderr.splitlines() if line.startswith("chatbus:")]
    assert len(problems) == 1
    assert problems[0].startswith(
        f"chatbus: configuration error: {config}: history.backend: unknown store 'nowhere'"
    )


def test_a_port_in_use_is_one_line_with_workers_too(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--port", str(port), "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"chatbus: port {port} is in use: set --port or CHATBUS_SERVER__PORT"
    )


def test_workers_come_from_the_config_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nworkers = 3\n")
    assert load_config(config).server.workers == 3
    assert load_config(config, {"CHATBUS_SERVER__WORKERS": "2"}).server.workers == 2
    config.write_text("[server]\nport = 8000\n")
    assert load_config(config, {}).server.workers == 1  # one process, no supervisor


def test_without_so_reuseport_workers_are_refused_saying_why() -> None:
    assert reuse_port_problem("linux") is None
    problem = reuse_port_problem("darwin")
    assert problem is not None and problem.startswith("--workers needs SO_REUSEPORT")


# --- two workers under load, on each store


@pytest.mark.parametrize("store", ["sqlite", "mongo"])
async def test_two_workers_under_load_lose_nothing_and_share_conversations(
    store: str, tmp_path: Path, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    upstream.behaviour.tokens = ["a ", "short ", "answer"]
    mongodb: MongoDatabase | None = request.getfixturevalue("mongodb") if store == "mongo" else None
    receiver = await Receiver().start()
    config = write_config(tmp_path, upstream, receiver.url, mongodb)
    chatbus = ChatbusProcess(config, None, "--workers", "2", log_level="info")
    chatbus.start()
    try:
        workers = await ready(chatbus)

        async def conversation(http: aiohttp.ClientSession, name: str) -> list[str]:
            message_ids = []
            for turn in range(TURNS):
                body = {"query": f"{name}-{turn}", "conversation_id": name, "history_len": TURNS}
                message_ids.append((await chat(http, chatbus.url, **body))["message_id"])
            return message_ids

        async with new_connections() as http:
            names = [f"c{i}" for i in range(CONVERSATIONS)]
            answered = await asyncio.gather(*(conversation(http, name) for name in names))
        async with opened_store(load_config(config)) as opened:
            stored = {name: await opened.messages("default", name, 100, 0) for name in names}
        completed = {t.message_id for turns in stored.values() for t in turns
                     if t.status is Status.COMPLETED}  # fmt: skip
        await wait_until(
            lambda: completed <= receiver.message_ids("chat.completed"), "every webhook", 30
        )
    finally:
        chatbus.stop()
        await receiver.stop()

    assert len(completed) == CONVERSATIONS * TURNS  # every turn stored, none lost or failed
    for name, message_ids in zip(names, answered, strict=True):
        assert [t.message_id for t in stored[name]] == message_ids
    # Spread: each worker (its instance id names its pid) answered a good share.
    by_pid = Counter(int(t.instance_id.split(":")[1]) for ts in stored.values() for t in ts)
    assert set(by_pid) == set(workers.values()) and min(by_pid.values()) >= 20, by_pid
    # Continuity: each turn's request to the model replayed every earlier turn, whichever
    # worker had answered them; many conversations went back and forth between workers.
    asked = {_last_query(r.body): r.body["messages"] for r in upstream.received}
    answer = "".join(upstream.behaviour.tokens)
    for name in names:
        for turn in range(TURNS):
            past = [{"role": role, "content": text} for k in range(turn)
                    for role, text in (("user", f"{name}-{k}"), ("assistant", answer))]  # fmt: skip
            assert asked[f"{name}-{turn}"][:-1] == past, (name, turn)
    mixed = [name for name, turns in stored.items() if len({t.instance_id for t in turns}) > 1]
    assert len(mixed) >= CONVERSATIONS // 4, by_pid
    # Webhooks: exactly one delivery a turn (claims are atomic across the workers).
    print(f"\n{store}: {len(completed)} turns, by worker {dict(by_pid)}, {len(mixed)}"
          f" conversations on both, {receiver.duplicates()} webhooks delivered twice")  # fmt: skip
    assert receiver.duplicates() == 0
    assert sorted(receiver.message_ids("chat.completed")) == sorted(completed)
    assert len(receiver.bodies) == len(completed)
    # Nothing failed for want of the SQLite file's lock.
    problems = defaultdict(list)
    for line in chatbus.log_lines():
        if line.get("level") in ("warning", "error"):
            problems[line["event"]].append(line)
    assert not problems, dict(problems)


def _last_query(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])
