"""What only the SQLite store has: its file, WAL mode, paths. The contract every store
fulfils is in chatbus/testing/store_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pydantic
import pytest

from chatbus.testing.store_contract import add_turn, record
from core.history import Conversation, Status, StoreUnavailable, Turn
from plugins.history_sqlite import make_store
from plugins.history_sqlite.store import SqliteStore
from tests.waiting import wait_until


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(str(db_path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def read_file_state(path: Path) -> tuple[str, int, int]:
    """journal_mode, user_version and row count, from a connection of our own."""
    assert path.is_file()
    connection = sqlite3.connect(path)
    try:
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        (count,) = connection.execute("SELECT count(*) FROM messages").fetchone()
    finally:
        connection.close()
    return mode, version, count


async def test_the_file_is_in_wal_mode(store: SqliteStore, db_path: Path) -> None:
    await store.add_message(record("m1"))
    # Another connection sees the committed row at once.
    mode, version, count = read_file_state(db_path)
    assert mode == "wal"
    assert version == 3
    assert count == 1


V1_MESSAGES = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL, tenant TEXT NOT NULL, chat_type TEXT NOT NULL,
    query TEXT NOT NULL, response TEXT NOT NULL DEFAULT '', status TEXT NOT NULL,
    model TEXT NOT NULL, usage TEXT, latency REAL, error TEXT,
    feedback_score INTEGER NOT NULL DEFAULT -1, feedback_reason TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL
);
INSERT INTO messages (message_id, conversation_id, tenant, chat_type, query, status, model,
    created_at) VALUES ('old', 'c1', 'default', 'llm_chat', 'q', 'streaming', 'echo', 1.0);
PRAGMA user_version = 1;
"""


async def test_a_file_from_before_leases_is_migrated(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        db.executescript(V1_MESSAGES)
    store = SqliteStore(str(db_path))
    await store.open()
    try:
        # The turn a crash left under version 1 has no instance: the first claimer ends it.
        (old,) = await store.claim_orphaned_turns("me", now=2.0, limit=10)
        assert (old.message_id, old.instance_id) == ("old", "me")
        await store.add_message(record("new", instance_id="me"))
    finally:
        await store.close()
    assert read_file_state(db_path)[1:] == (3, 2)


async def test_data_survives_close_and_reopen(db_path: Path) -> None:
    first = SqliteStore(str(db_path))
    await first.open()
    await add_turn(first, "m1", "q1", "a1")
    await first.add_message(record("m2", "q2"))
    await first.set_feedback("default", "m1", 70, "fine")
    await first.close()

    second = SqliteStore(str(db_path))
    await second.open()  # opening again keeps the schema and the rows
    try:
        got = await second.get_message("default", "m1")
        assert got is not None
        assert (got.response, got.status, got.feedback_score) == ("a1", Status.COMPLETED, 70)
        assert await second.recent_turns("default", "c1", 10) == [Turn("q1", "a1")]
        await add_turn(second, "m3", "q3", "a3")
        assert await second.recent_turns("default", "c1", 10) == [
            Turn("q1", "a1"),
            Turn("q3", "a3"),
        ]
    finally:
        await second.close()


async def test_closed_store_refuses_use(db_path: Path) -> None:
    store = SqliteStore(str(db_path))
    with pytest.raises(RuntimeError):
        await store.get_message("default", "m1")
    await store.open()
    await store.close()
    await store.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        await store.add_message(record("m1"))


async def test_make_store_resolves_against_base_dir(tmp_path: Path) -> None:
    store = make_store({"path": "sub/x.db"}, tmp_path)
    assert isinstance(store, SqliteStore)
    assert store.path == str(tmp_path / "sub" / "x.db")
    assert not (tmp_path / "sub").exists()
    await store.open()
    try:
        await add_turn(store, "m1", "q", "a")
    finally:
        await store.close()
    assert (tmp_path / "sub").is_dir()
    assert (tmp_path / "sub" / "x.db").is_file()


def test_make_store_default_path(tmp_path: Path) -> None:
    assert make_store({}, tmp_path).path == str(tmp_path / "chatbus.db")


def test_make_store_absolute_path(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "y.db"
    assert make_store({"path": str(absolute)}, tmp_path / "base").path == str(absolute)


async def test_make_store_in_memory(tmp_path: Path) -> None:
    store = make_store({"path": ":memory:"}, tmp_path)
    assert store.path == ":memory:"
    await store.open()
    try:
        await add_turn(store, "m1", "q", "a")
        assert await store.recent_turns("default", "c1", 1) == [Turn("q", "a")]
    finally:
        await store.close()
    assert files_in(tmp_path) == []


def files_in(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def test_make_store_unknown_option(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        make_store({"path": "x.db", "pth": "y.db"}, tmp_path)
    error = info.value.errors()[0]
    assert error["loc"] == ("pth",)
    assert error["type"] == "extra_forbidden"


# A file as version 2 wrote it (before the conversations table), with turns in it.
V2_FILE = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL, tenant TEXT NOT NULL, chat_type TEXT NOT NULL,
    query TEXT NOT NULL, response TEXT NOT NULL DEFAULT '', status TEXT NOT NULL,
    model TEXT NOT NULL, usage TEXT, latency REAL, error TEXT,
    feedback_score INTEGER NOT NULL DEFAULT -1, feedback_reason TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
    instance_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX messages_by_conversation ON messages (tenant, conversation_id, seq);
CREATE TABLE instances (instance_id TEXT PRIMARY KEY, lease_until REAL NOT NULL);
CREATE INDEX messages_streaming ON messages (instance_id) WHERE status = 'streaming';
INSERT INTO messages (message_id, conversation_id, tenant, chat_type, query, status, model,
    created_at) VALUES
    ('a1', 'a', 'default', 'llm_chat', 'first of a', 'completed', 'echo', 10.0),
    ('b1', 'b', 'default', 'llm_chat', 'first of b', 'failed', 'echo', 20.0),
    ('a2', 'a', 'default', 'llm_chat', 'second of a', 'completed', 'echo', 30.0),
    ('x1', 'x', 'other', 'llm_chat', 'theirs', 'completed', 'echo', 5.0),
    ('n1', '', 'default', 'llm_chat', 'no conversation', 'completed', 'echo', 40.0),
    ('b2', 'b', 'default', 'llm_chat', 'second of b', 'streaming', 'echo', 25.0);
PRAGMA user_version = 2;
"""


def summaries(listed: list[Conversation]) -> list[tuple[str, int, str, float, float]]:
    return [(c.conversation_id, c.turns, c.first_query, c.created_at, c.updated_at) for c in listed]


async def test_a_file_from_before_the_conversations_table_is_migrated(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        db.executescript(V2_FILE)
    for reopened in range(2):  # built once: opening again neither rebuilds nor doubles it
        store = SqliteStore(str(db_path))
        await store.open()
        try:
            assert summaries(await store.conversations("default", 10, 0)) == [
                ("b", 2 + reopened, "first of b", 20.0, 25.0 if reopened == 0 else 50.0),
                ("a", 2, "first of a", 10.0, 30.0),
            ]
            assert summaries(await store.conversations("other", 10, 0)) == [
                ("x", 1, "theirs", 5.0, 5.0)
            ]
            if reopened == 0:  # a turn after the migration is counted by the triggers
                await add_turn(store, "b3", "third of b", "r", conversation_id="b",
                               created_at=50.0)  # fmt: skip
        finally:
            await store.close()
    assert read_file_state(db_path)[1:] == (3, 7)


async def test_a_read_does_not_wait_behind_the_writer(store: SqliteStore) -> None:
    """The writer's thread held (a job in a write transaction that waits for the test): a
    listing and a read of a turn still answer, and the writes queued meanwhile commit
    once it is let go."""
    await add_turn(store, "m1", "q", "a", conversation_id="c")
    inside, release = threading.Event(), threading.Event()

    def hold(db: sqlite3.Connection) -> None:
        inside.set()
        release.wait(30)

    held = asyncio.ensure_future(store._worker.run(hold))
    try:
        await wait_until(inside.is_set, "the writer holding its transaction")
        queued = asyncio.ensure_future(add_turn(store, "m2", "q2", "a2", conversation_id="d"))
        listed = await asyncio.wait_for(store.conversations("default", 10, 0), 20)
        assert [c.conversation_id for c in listed] == ["c"]
        got = await asyncio.wait_for(store.get_message("default", "m1"), 20)
        assert got is not None and got.response == "a"
        assert not held.done() and not queued.done()  # the writer was busy all along
    finally:
        release.set()
        await held
    await asyncio.wait_for(queued, 20)
    assert [c.conversation_id for c in await store.conversations("default", 10, 0)] == ["d", "c"]


async def test_reads_are_on_read_only_connections(store: SqliteStore) -> None:
    await add_turn(store, "m1", "q", "a")
    with pytest.raises(StoreUnavailable):  # query_only: "attempt to write a readonly database"
        await store._worker.read("DELETE FROM messages", ())
    assert await store.get_message("default", "m1") is not None


async def test_a_file_locked_past_the_busy_wait_is_opened_once_free(db_path: Path) -> None:
    """Another process holds the file longer than SQLite's busy wait (5 s: a second instance
    migrating a large file, say): opening is refused "database is locked", and tried again
    until the file is free, within OPEN_SECONDS."""
    sqlite3.connect(db_path).close()
    holder = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(6.5, holder.execute, ("COMMIT",))
    released.start()
    store = SqliteStore(str(db_path))
    try:
        await store.open()
        await add_turn(store, "m1", "q", "a")
        assert await store.recent_turns("default", "c1", 1) == [Turn("q", "a")]
    finally:
        released.join()
        holder.close()
        await store.close()
