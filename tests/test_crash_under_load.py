"""kill -9 under load, again and again, on each store: no turn that was stored `completed`
is left without its webhook. A real chatbus process serves many short chats at once, with a
webhook endpoint on a real receiver; it is killed at a moment nobody chose, restarted
on the same store, killed again; at the end a last restart delivers what is owed.

On MongoDB without this (the end of a turn, then its deliveries: two writes), such a run
lost the webhooks of 5.8% of its completed turns."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from pymongo import MongoClient

from chatbus.testing.fake_upstream import FakeUpstream
from tests.mongo_server import MongoDatabase
from tests.processes import SECRET_ENV, ChatbusProcess, Receiver
from tests.waiting import wait_until

CYCLES = 4
CLIENTS = 12
LOAD_SECONDS = 1.5  # of chats before each kill
CONFIG = """\
default_model = "fast"
[server]
access_log = false
[chat]
checkpoint_seconds = 0
[history]
backend = "{backend}"
lease_seconds = 2
heartbeat_seconds = 0.5
[history.sqlite]
path = "crash.db"
[history.mongo]
uri = "{mongo_uri}"
database = "{mongo_database}"
transactions = {transactions}
[[plugins.webhooks.endpoints]]
url = "{receiver}"
secret_env = "{secret_env}"
events = ["chat_completed"]
[plugins.webhooks.delivery]
lease_seconds = 2           # what the killed process was sending is sent again after this
poll_seconds = 0.05
per_destination = 32        # one receiver takes every delivery: not held to 4 at once
schedule = [0.1, 0.2, 0.5, 1, 1, 1]
[models.fast]
provider = "openai_compat"
base_url = "{upstream}"
model = "fake-model"
retries = 0
"""


async def chat_until(url: str, stop: asyncio.Event) -> int:
    """One client: chats one after another until `stop`; a killed server is no error."""
    answered = 0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.post(url + "/chat/chat", json={"query": "q"}) as response:
                    await response.read()
                    answered += response.status == 200
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)  # killed: the next server comes up on this port
    return answered


def completed_turns(tmp_path: Path, mongodb: MongoDatabase | None) -> set[str]:
    if mongodb is None:
        with sqlite3.connect(tmp_path / "crash.db") as db:
            rows = db.execute("SELECT message_id FROM messages WHERE status = 'completed'")
            return {message_id for (message_id,) in rows}
    client: MongoClient[dict[str, object]] = MongoClient(mongodb.uri)
    try:
        turns = client[mongodb.name]["messages"].find({"status": "completed"}, {"_id": 1})
        return {str(turn["_id"]) for turn in turns}
    finally:
        client.close()


# MongoDB in both modes. With transactions, a kill -9 leaves the killed process's open
# transactions on the server, holding their turns until the server aborts them (mongod:
# transactionLifetimeLimitSeconds, 60 s by default; the suite's SecantusDB: a few seconds,
# tests/secantus_server.py); those turns stay `streaming` until then, and then end
# `interrupted` like the others. Nothing is lost meanwhile: uncommitted, a turn's end is
# not `completed`.
@pytest.mark.parametrize(
    "store", ["sqlite", "mongo-without-transactions", "mongo-with-transactions"]
)
async def test_kill_9_under_load_loses_no_webhook(
    store: str, tmp_path: Path, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    upstream.behaviour.tokens = ["a ", "short ", "answer"]
    mongodb: MongoDatabase | None = None
    if store.startswith("mongo"):
        mongodb = request.getfixturevalue("mongodb")
    receiver = await Receiver().start()
    config = tmp_path / "load.toml"
    config.write_text(
        CONFIG.format(
            backend="mongo" if mongodb else "sqlite",
            mongo_uri=mongodb.uri if mongodb else "",
            mongo_database=mongodb.name if mongodb else "",
            transactions='"auto"' if store == "mongo-with-transactions" else "false",
            receiver=receiver.url,
            secret_env=SECRET_ENV,
            upstream=upstream.base_url,
        )
    )
    chatbus = ChatbusProcess(config)
    answered = 0
    try:
        for _ in range(CYCLES):
            chatbus.start()
            stop = asyncio.Event()
            clients = [asyncio.create_task(chat_until(chatbus.url, stop)) for _ in range(CLIENTS)]
            await asyncio.sleep(LOAD_SECONDS)  # the load runs; the kill lands wherever it is
            chatbus.kill()
            stop.set()
            answered += sum(await asyncio.gather(*clients))
        chatbus.start()  # the last restart: it delivers what the others owed

        def lost() -> set[str]:
            return completed_turns(tmp_path, mongodb) - receiver.message_ids("chat.completed")

        started = time.monotonic()
        try:
            # Generous: on SecantusDB a claim of the outbox scans it (no index is used), tens
            # of ms each at the hundreds of deliveries a run leaves owed.
            await wait_until(lambda: not lost(), "every completed turn's webhook", timeout=90)
        finally:
            missing, completed = lost(), completed_turns(tmp_path, mongodb)
            print(
                f"\n{store}: {CYCLES} kill -9 cycles, {answered} answers, {len(completed)}"
                f" turns completed, {len(missing)} without their webhook, {receiver.duplicates()}"
                f" delivered twice; drained in {time.monotonic() - started:.1f} s"
            )
    finally:
        chatbus.stop()
        await receiver.stop()
    assert answered > CYCLES * CLIENTS  # it was under load
    assert missing == set()
