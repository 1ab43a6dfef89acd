"""Three chatbus instances on one MongoDB database (the suite's SecantusDB), in each
delivery mode, and two on one SQLite file; each a real process on its own port, as behind a
load balancer. Streams and async chats run on all
three; one is killed (kill -9) mid-stream. Within its lease and a poll, the other two end
every turn it was running `interrupted` and deliver their `chat_failed` webhooks and the
async chats' callbacks; their own streams end normally. Deliveries are at least once: a
delivery received twice (same webhook-id) is counted and reported, not failed."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from pymongo import AsyncMongoClient

from chatbus.testing.fake_upstream import FakeUpstream
from tests.mongo_server import MongoDatabase
from tests.processes import SECRET_ENV, ChatbusProcess, Receiver
from tests.waiting import wait_until

INSTANCES = 3
STREAMS, ASYNC_CHATS = 3, 2  # on each instance
TOKENS = [f"t{i} " for i in range(150)]
TOKEN_DELAY = 0.04  # 6 s an answer: all are running at the kill
LEASE, HEARTBEAT = 2.0, 0.5
SLACK = 20.0  # past lease + heartbeat: generous, the machine may be loaded; measured, reported
CONFIG = """\
default_model = "slow"
[server]
access_log = false
[chat]
checkpoint_seconds = 0.2
[history]
backend = "{backend}"
lease_seconds = {lease}
heartbeat_seconds = {heartbeat}
[history.sqlite]
path = "instances.db"
[history.mongo]
uri = "{mongo_uri}"
database = "{mongo_database}"
transactions = {transactions}
[plugins.webhooks]
callback_hosts = ["127.0.0.1:{receiver_port}"]
[[plugins.webhooks.endpoints]]
url = "{receiver}"
secret_env = "{secret_env}"
events = ["chat_completed", "chat_failed"]
[plugins.webhooks.delivery]
lease_seconds = 2
poll_seconds = 0.05
per_destination = 32
schedule = [0.1, 0.2, 0.5, 1, 1, 1]
[models.slow]
provider = "openai_compat"
base_url = "{upstream}"
model = "fake-model"
retries = 0
"""


async def stream_one(http: aiohttp.ClientSession, url: str, started: asyncio.Event) -> str | None:
    """A streamed chat read to its end: its text, or None if it broke (its instance was
    killed). `started` is set at its first frame."""
    text = ""
    async with http.post(url + "/chat/chat", json={"query": "go", "stream": True}) as response:
        assert response.status == 200
        try:
            async for line in response.content:
                if line.startswith(b"data: "):
                    text += orjson.loads(line[6:])["text"]
                    started.set()
        except aiohttp.ClientError:
            return None
    return text


async def stored_turns(store: Path | MongoDatabase) -> list[dict[str, Any]]:
    """Every turn's id, status and instance, as stored."""
    if isinstance(store, Path):
        with sqlite3.connect(store) as db:
            rows = db.execute("SELECT message_id, status, instance_id FROM messages")
            return [{"_id": i, "status": s, "instance_id": at} for i, s, at in rows]
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(store.uri)
    try:
        fields = {"status": 1, "instance_id": 1}
        return await client[store.name]["messages"].find({}, fields).to_list(None)
    finally:
        await client.close()


def pid_of(instance_id: str) -> int:
    """Instance ids are host:pid:random (core/instances.py)."""
    return int(instance_id.split(":")[1])


@pytest.mark.parametrize("store", ["mongo-transactions", "mongo-held", "sqlite"])
async def test_instances_one_killed_mid_stream(
    store: str, tmp_path: Path, upstream: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    """Three on MongoDB, two on SQLite (each process its own writer on one file)."""
    on: Path | MongoDatabase = tmp_path / "instances.db"  # [history.sqlite] path
    if store.startswith("mongo"):
        on = request.getfixturevalue("mongodb")
    mongodb = on if isinstance(on, MongoDatabase) else MongoDatabase(uri="", name="")
    count = INSTANCES if store.startswith("mongo") else 2
    upstream.behaviour.tokens = TOKENS
    upstream.behaviour.delay = TOKEN_DELAY
    receiver = await Receiver().start()
    config = tmp_path / "instances.toml"
    config.write_text(
        CONFIG.format(
            backend="sqlite" if store == "sqlite" else "mongo", lease=LEASE, heartbeat=HEARTBEAT,
            mongo_uri=mongodb.uri, mongo_database=mongodb.name,
            transactions='"auto"' if store == "mongo-transactions" else "false",
            receiver_port=receiver.port, receiver=receiver.url, secret_env=SECRET_ENV,
            upstream=upstream.base_url,
        )
    )  # fmt: skip
    instances = [ChatbusProcess(config) for _ in range(count)]
    try:
        await asyncio.gather(*(asyncio.to_thread(instance.start) for instance in instances))
        async with aiohttp.ClientSession() as http:
            streams: dict[int, list[asyncio.Task[Any]]] = {}
            for index, instance in enumerate(instances):
                for _ in range(ASYNC_CHATS):
                    chat = {"query": "go", "callback_url": receiver.url}
                    async with http.post(instance.url + "/chat/chat", json=chat) as response:
                        assert response.status == 202
                began = [asyncio.Event() for _ in range(STREAMS)]
                streams[index] = [
                    asyncio.create_task(stream_one(http, instance.url, event)) for event in began
                ]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in began)), timeout=15)
            turns = await stored_turns(on)
            pids = [instance.process.pid for instance in instances if instance.process]
            running = {pid: [t for t in turns if pid_of(t["instance_id"]) == pid] for pid in pids}
            assert all(len(r) == STREAMS + ASYNC_CHATS for r in running.values()), running
            assert {t["status"] for t in turns} == {"streaming"}, turns  # all in flight at the kill
            victim = instances[0]
            victims = {t["_id"] for t in running[pids[0]]}
            survivors = {t["_id"] for t in turns} - victims

            victim.kill()
            killed_at = time.monotonic()

            async def victims_interrupted() -> bool:
                ended = {t["_id"]: t for t in await stored_turns(on) if t["_id"] in victims}
                statuses = {t["status"] for t in ended.values()}
                return len(ended) == len(victims) and statuses == {"interrupted"}

            await wait_until(victims_interrupted, "the killed instance's turns interrupted",
                             timeout=LEASE + HEARTBEAT + SLACK, interval=0.05)  # fmt: skip
            time_to_interrupt = time.monotonic() - killed_at
            survivors_streams = [task for i in range(1, count) for task in streams[i]]
            ended_streams = await asyncio.wait_for(asyncio.gather(*survivors_streams), 30)
            for task in streams[0]:
                task.cancel()
            await asyncio.gather(*streams[0], return_exceptions=True)

            def delivered() -> bool:
                failed = receiver.message_ids("chat.failed")
                completed = receiver.message_ids("chat.completed")
                return failed >= victims and completed >= survivors

            await wait_until(delivered, "the webhooks and callbacks", timeout=SLACK)
    finally:
        for instance in instances:
            instance.stop()
        await receiver.stop()

    print(
        f"\n{count} instances on {store}, kill -9 of one: its {len(victims)}"
        f" turns interrupted {time_to_interrupt:.1f} s after the kill (lease {LEASE:g} s, heartbeat"
        f" {HEARTBEAT:g} s); {len(receiver.bodies)} deliveries, {receiver.duplicates()}"
        " delivered twice"
    )
    # The others' streams ended normally: the whole answer, nothing after it.
    assert ended_streams == ["".join(TOKENS)] * len(survivors_streams)
    # Every turn of the killed instance: interrupted by a live one, with its chat_failed
    # webhook; an async one's callback too (two deliveries, two webhook-ids).
    by_message: dict[str, set[tuple[str, str]]] = {}
    for delivery, webhook_id in zip(receiver.bodies, receiver.webhook_ids, strict=True):
        entry = (delivery["type"], webhook_id)
        by_message.setdefault(delivery["data"]["message_id"], set()).add(entry)
    for message_id in victims:
        kinds = {kind for kind, _ in by_message[message_id]}
        assert kinds == {"chat.failed"}, kinds
    failed = [body for body in receiver.bodies if body["type"] == "chat.failed"]
    assert {body["data"]["error_type"] for body in failed} == {"interrupted"}
    deliveries_per_victim = sorted(len(by_message[m]) for m in victims)
    assert deliveries_per_victim == [1] * STREAMS + [2] * ASYNC_CHATS  # webhook (+ callback)
    for message_id in survivors:
        assert {kind for kind, _ in by_message[message_id]} == {"chat.completed"}
