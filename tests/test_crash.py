"""kill -9 in the middle of answers, then a restart on the same store: every turn that was
running ends `interrupted`, keeps the answer up to its last checkpoint, and its end event
goes out, so the async chats' callbacks arrive. chatbus runs as a real process; the
upstream and the callback receiver are real servers in the test, all on loopback."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from chatbus.testing.fake_upstream import FakeUpstream
from core.history import Status
from plugins.history_sqlite.store import SqliteStore
from tests.processes import ChatbusProcess, Receiver
from tests.waiting import wait_until

ASYNC_CHATS = 15
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
    receiver = await Receiver().start()
    config = tmp_path / "crash.toml"
    config.write_text(CONFIG.format(receiver_port=receiver.port, upstream=upstream.base_url))
    chatbus = ChatbusProcess(config).start()
    url = chatbus.url
    seen = ""
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(ASYNC_CHATS):
                body = {"query": "go", "callback_url": receiver.url}
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
                chatbus.kill()
        assert receiver.bodies == []  # nothing ended before the kill
        chatbus.start()  # the same port and store: the next instance
        await receiver.wait_for(ASYNC_CHATS, timeout=20)
    finally:
        chatbus.stop()
        await receiver.stop()

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
