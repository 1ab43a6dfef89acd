"""When the history store is down: at start-up, mid-run, and after an answer streamed.
The real MongoDB driver against a port where nothing listens, and a store whose outage a
test switches on and off (SQLite underneath), for the recovery."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from pymongo import MongoClient

from core.history import HistoryStore, MessageRecord, Outcome, Status, StoreUnavailable
from core.hookspecs import hookimpl
from core.outbox import Delivery
from plugins.history_sqlite.outbox import SqliteOutbox
from plugins.history_sqlite.store import SqliteStore
from tests.conftest import Chatbus, StartChatbus, webhook_settings
from tests.mongo_server import MongoServer
from tests.sse import Stream
from tests.waiting import wait_until


class FlakyStore(SqliteStore):
    """SQLite, with outages on demand: `down` fails everything, `fail_finishes` fails the
    next N writes of how a turn ended."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.down = False
        self.fail_finishes = 0
        self.leaky_errors = False  # fail finishes as a driver may: the document in the text
        self.outbox.add_deliveries = self.add_deliveries  # type: ignore[method-assign]

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("switched off by the test")

    async def ping(self) -> None:
        self._check()
        await super().ping()

    async def add_message(self, record: MessageRecord) -> None:
        self._check()
        await super().add_message(record)

    async def recent_turns(self, *args: Any) -> Any:
        self._check()
        return await super().recent_turns(*args)

    async def finish_message(
        self, message_id: str, outcome: Outcome, deliveries: Sequence[Delivery] = ()
    ) -> None:
        if self.fail_finishes:
            self.fail_finishes -= 1
            if self.leaky_errors:  # as pymongo's BulkWriteError carries what it could not write
                raise RuntimeError(f"write failed: {{'response': {outcome.response!r}}}")
            raise StoreUnavailable("switched off by the test")
        await super().finish_message(message_id, outcome, deliveries)

    async def add_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        """The outbox's, in place of SqliteOutbox's (see __init__), failing as a driver may
        when `leaky_errors`: what it could not write, in the error's text."""
        if self.leaky_errors:
            raise RuntimeError(f"write failed: {[d.payload for d in deliveries]!r}")
        await SqliteOutbox.add_deliveries(self.outbox, deliveries)

    async def claim_orphaned_turns(
        self, instance_id: str, now: float, limit: int
    ) -> list[MessageRecord]:
        self._check()
        return await super().claim_orphaned_turns(instance_id, now, limit)


class Flaky:
    def __init__(self) -> None:
        self.store: FlakyStore | None = None

    @hookimpl
    def register_history_stores(self, register: Any) -> None:
        def make(options: dict[str, Any], base_dir: Path) -> FlakyStore:
            self.store = FlakyStore(str(base_dir / "flaky.db"))
            self.store.down = options.get("down", False)
            return self.store

        register("flaky", make)


async def ready(chatbus: Chatbus) -> tuple[int, dict[str, Any]]:
    async with chatbus.http.get(chatbus.url + "/health/ready") as response:
        return response.status, await response.json()


async def assert_503_before_anything(chatbus: Chatbus) -> None:
    for stream in (True, False):
        async with chatbus.post("/chat/chat", {"query": "hi", "stream": stream}) as response:
            assert response.status == 503
            assert response.content_type == "application/json"
            error = (await response.json())["error"]
        assert error["type"] == "store_unavailable"
        assert "try again" in error["message"]


async def test_mongodb_unreachable_at_start_up(start_chatbus: StartChatbus) -> None:
    # The real driver, against a port where nothing listens: start-up does not fail.
    chatbus = await start_chatbus(
        history={
            "backend": "mongo",
            "mongo": {"uri": "mongodb://127.0.0.1:9/", "server_selection_timeout": 0.2},
        }
    )
    status, body = await ready(chatbus)
    assert status == 503
    assert body["status"] == "unavailable"
    assert "MongoDB unreachable" in body["store"]
    await assert_503_before_anything(chatbus)
    async with chatbus.post("/chat/feedback", {"message_id": "m", "score": 5}) as response:
        assert response.status == 503
    assert chatbus.events.of("chat_started") == []
    async with chatbus.http.get(chatbus.url + "/health/live") as response:
        assert response.status == 200


async def test_down_at_start_up_then_back(start_chatbus: StartChatbus) -> None:
    flaky = Flaky()
    chatbus = await start_chatbus(flaky, history={"backend": "flaky", "flaky": {"down": True}})
    assert (await ready(chatbus))[0] == 503
    await assert_503_before_anything(chatbus)
    assert flaky.store is not None
    flaky.store.down = False  # the store comes back: nothing to restart
    assert await ready(chatbus) == (200, {"status": "ready", "store": "ok"})
    assert (await chatbus.chat(query="back again")).text == "back again"


async def test_down_mid_run_then_back(start_chatbus: StartChatbus) -> None:
    flaky = Flaky()
    chatbus = await start_chatbus(flaky, history={"backend": "flaky"})
    assert (await chatbus.chat(query="before")).text == "before"
    assert flaky.store is not None
    flaky.store.down = True
    await assert_503_before_anything(chatbus)
    flaky.store.down = False
    assert (await chatbus.chat(query="after")).text == "after"


async def completed(store: HistoryStore, message_id: str) -> MessageRecord | None:
    """The record of `message_id` once it is completed, else None."""
    record = await store.get_message("default", message_id)
    assert record is not None
    return record if record.status is Status.COMPLETED else None


async def test_an_answer_whose_end_cannot_be_stored_is_retried(
    start_chatbus: StartChatbus,
) -> None:
    flaky = Flaky()
    chatbus = await start_chatbus(flaky, history={"backend": "flaky"})
    assert flaky.store is not None
    flaky.store.fail_finishes = 2
    with structlog.testing.capture_logs() as logs:
        stream = await chatbus.chat(query="keep this answer")
        assert stream.text == "keep this answer"  # the client got all of it
        (message_id,) = stream.message_ids
        store = flaky.store
        record = await wait_until(lambda: completed(store, message_id), "the end stored")
    assert record is not None
    assert record.response == "keep this answer"
    retries = [e for e in logs if e["event"] == "could not store the end of a turn; retrying"]
    assert len(retries) == 2
    assert all(e["message_id"] == message_id for e in retries)
    assert any(e["event"] == "stored the end of a turn after retrying" for e in logs)


async def test_an_answer_never_stored_is_not_logged_at_shutdown(
    start_chatbus: StartChatbus,
) -> None:
    flaky = Flaky()
    chatbus = await start_chatbus(
        flaky, history={"backend": "flaky"}, server={"shutdown_grace_seconds": 0.2}
    )
    assert flaky.store is not None
    flaky.store.fail_finishes = 1_000_000
    flaky.store.leaky_errors = True  # an error's text is no safer a place for it than the log
    answer = "the only copy of a private answer"
    with structlog.testing.capture_logs() as logs:
        stream = await chatbus.chat(query=answer)
        await chatbus.close()  # shuts down while the store still fails
    assert stream.text == answer
    (message_id,) = stream.message_ids
    (last,) = [e for e in logs if e["event"].startswith("could not store the end of a turn bef")]
    assert (last["message_id"], last["answer_chars"]) == (message_id, len(answer))
    assert last["log_level"] == "error"
    assert not [event for event in logs if "private answer" in repr(event)]
    # The turn stays `streaming` under the instance that stopped, for the next to end.
    store = SqliteStore(flaky.store.path)
    await store.open()
    try:
        record = await store.get_message("default", message_id)
    finally:
        await store.close()
    assert record is not None and record.status is Status.STREAMING


async def test_turns_left_streaming_are_ended_interrupted_at_start_up(
    tmp_path: Path, start_chatbus: StartChatbus
) -> None:
    store = SqliteStore(str(tmp_path / "chat.db"))  # the file the chatbus below uses
    await store.open()
    meta = {"callback_url": "http://127.0.0.1:9/cb"}
    crashed = MessageRecord("crashed", "c", "q", "echo", created_at=time.time() - 5, meta=meta)
    await store.add_message(crashed)
    await store.save_partial("crashed", "what the client saw")
    for i in range(150):  # more than one batch
        await store.add_message(MessageRecord(f"m{i}", "c2", "q", "echo", created_at=1.0))
    await store.close()
    chatbus = await start_chatbus()
    record = await chatbus.store.get_message("default", "crashed")
    assert record is not None
    assert (record.status, record.error) == (Status.INTERRUPTED, "interrupted")
    assert record.response == "what the client saw"
    with sqlite3.connect(tmp_path / "chat.db") as db:
        assert db.execute(
            "SELECT count(*) FROM messages WHERE status = 'streaming'"
        ).fetchone() == (0,)
    # Each is published as a failed turn: its webhooks and callback go out.
    failed = await chatbus.events.wait_for("chat_failed", 151)
    ended = {event.message_id: event for event in failed}
    event = ended["crashed"]
    assert (event.error_type, event.text) == ("interrupted", "what the client saw")  # type: ignore[attr-defined]
    assert event.callback_url == "http://127.0.0.1:9/cb"  # type: ignore[attr-defined]
    (delivery,) = await chatbus.store.outbox.deliveries(None, 10)  # the callback, in the outbox
    assert delivery.message_id == "crashed"
    assert b'"error_type":"interrupted"' in delivery.payload.encode()


async def test_turns_of_a_live_instance_are_spared(
    tmp_path: Path, start_chatbus: StartChatbus
) -> None:
    store = SqliteStore(str(tmp_path / "chat.db"))
    await store.open()
    now = time.time()
    await store.keep_lease("other", now, now + 600)  # another instance, alive
    await store.add_message(MessageRecord("live", "c", "q", "echo", instance_id="other"))
    await store.add_message(MessageRecord("dead", "c", "q", "echo", instance_id="gone"))
    await store.close()
    chatbus = await start_chatbus()
    live = await chatbus.store.get_message("default", "live")
    dead = await chatbus.store.get_message("default", "dead")
    assert live is not None and live.status is Status.STREAMING
    assert dead is not None and dead.status is Status.INTERRUPTED


async def test_the_retired_sweep_setting_is_a_warning(start_chatbus: StartChatbus) -> None:
    with structlog.testing.capture_logs() as logs:
        chatbus = await start_chatbus(history={"sweep_after_seconds": 600})
    assert (await chatbus.chat(query="still runs")).text == "still runs"
    (warning,) = [e for e in logs if "sweep_after_seconds" in e["event"]]
    assert warning["log_level"] == "warning"
    assert "lease_seconds" in warning["event"]


async def test_a_wrong_mongodb_password_is_an_unavailable_store(
    start_chatbus: StartChatbus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A real server that requires SCRAM: its user made first, then restarted with --auth.
    server = MongoServer(tmp_path / "mongo-data").start()
    client: MongoClient[dict[str, Any]]
    try:
        with MongoClient(server.uri()) as client:
            roles = [{"role": "readWrite", "db": "chatbus"}]
            client.admin.command("createUser", "chatbus", pwd="right-pw", roles=roles)
    finally:
        server.stop()
    server.auth = True
    server.start()
    try:
        monkeypatch.setenv("CHATBUS_TEST_MONGO_URI", server.uri("chatbus:wr0ng-pa55word"))
        mongo = {"uri_env": "CHATBUS_TEST_MONGO_URI", "server_selection_timeout": 0.5}
        history = {"backend": "mongo", "mongo": mongo}
        chatbus = await start_chatbus(history=history)  # it starts: no traceback, no exit
        status, body = await ready(chatbus)
        assert status == 503
        assert "authentication failed" in body["store"]
        await assert_503_before_anything(chatbus)
        await chatbus.close()
        # The same server with the right password: the user really is there.
        monkeypatch.setenv("CHATBUS_TEST_MONGO_URI", server.uri("chatbus:right-pw"))
        chatbus = await start_chatbus(history=history)
        assert (await ready(chatbus))[0] == 200
        assert (await chatbus.chat_json(query="in"))[0] == 200
        await chatbus.close()  # while its server still runs
    finally:
        server.stop()
    captured = capsys.readouterr()
    assert "wr0ng-pa55word" not in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


async def test_mongodb_down_mid_run_then_back(start_chatbus: StartChatbus, tmp_path: Path) -> None:
    # A real MongoDB-compatible server that stops and comes back on the same port and data.
    server = MongoServer(tmp_path / "mongo-data").start()
    try:
        mongo = {"uri": server.uri(), "server_selection_timeout": 0.5, "operation_timeout": 2}
        chatbus = await start_chatbus(history={"backend": "mongo", "mongo": mongo})
        before = await chatbus.chat(query="before")
        assert before.text == "before"
        server.stop()
        status, body = await ready(chatbus)
        assert (status, "MongoDB unreachable" in body["store"]) == (503, True)
        await assert_503_before_anything(chatbus)
        server.start()

        async def answered() -> Stream | None:
            stream = await chatbus.chat(query="after")
            return stream if stream.status == 200 else None

        after = await wait_until(answered, "an answer again")
        assert after is not None and after.text == "after"
        (message_id,) = before.message_ids
        kept = await chatbus.store.get_message("default", message_id)  # nothing was lost
        assert kept is not None and kept.response == "before"
        await chatbus.close()
    finally:
        server.stop()


async def test_deliveries_that_cannot_be_queued_are_not_logged(
    start_chatbus: StartChatbus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chat_received webhook carries the query: a store error quoting what it could not
    write must not put it in the log (the error's type is logged, with the message id)."""
    monkeypatch.setenv("HOOK_SECRET", "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0")
    endpoints = [{"url": "http://127.0.0.1:1/hook", "secret_env": "HOOK_SECRET",
                  "events": ["chat_received"]}]  # fmt: skip
    flaky = Flaky()
    chatbus = await start_chatbus(
        flaky, history={"backend": "flaky"}, **webhook_settings(endpoints=endpoints)
    )
    assert flaky.store is not None
    flaky.store.leaky_errors = True
    with structlog.testing.capture_logs() as logs:
        stream = await chatbus.chat(query="a private question")
    assert stream.text == "a private question"
    (message_id,) = stream.message_ids
    (failed,) = [e for e in logs if e["event"] == "could not queue deliveries"]
    assert (failed["message_id"], failed["error"]) == (message_id, "RuntimeError")
    assert not [event for event in logs if "private question" in repr(event)]
