"""plugins.history_sqlite: the SQLite store on a real file."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pydantic
import pytest

from core.history import MessageRecord, Outcome, Status, Turn
from core.providers import Usage
from plugins.history_sqlite import make_store
from plugins.history_sqlite.store import SqliteStore


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


def record(message_id: str, query: str = "q", **fields: object) -> MessageRecord:
    values: dict[str, object] = {
        "message_id": message_id,
        "conversation_id": "c1",
        "query": query,
        "model": "echo",
        "created_at": 1_700_000_000.0,
    }
    values.update(fields)
    return MessageRecord(**values)  # type: ignore[arg-type]


def done(response: str, status: Status = Status.COMPLETED, **fields: object) -> Outcome:
    values: dict[str, object] = {"response": response, "status": status, "usage": None}
    values.update({"latency": 0.5, **fields})
    return Outcome(**values)  # type: ignore[arg-type]


async def add_turn(
    store: SqliteStore, message_id: str, query: str, response: str, **fields: object
) -> None:
    await store.add_message(record(message_id, query, **fields))
    await store.finish_message(message_id, done(response))


async def test_add_then_get(store: SqliteStore) -> None:
    added = record(
        "m1",
        "hello",
        tenant="acme",
        chat_type="agent_chat",
        meta={"client": "curl", "tags": ["a", 1, None]},
        created_at=1_700_000_123.456789,
    )
    await store.add_message(added)
    got = await store.get_message("acme", "m1")
    assert got == MessageRecord(
        message_id="m1",
        conversation_id="c1",
        query="hello",
        model="echo",
        tenant="acme",
        chat_type="agent_chat",
        response="",
        status=Status.STREAMING,
        usage=None,
        latency=None,
        error=None,
        feedback_score=-1,
        feedback_reason="",
        meta={"client": "curl", "tags": ["a", 1, None]},
        created_at=1_700_000_123.456789,
    )
    assert got.status is Status.STREAMING


async def test_get_unknown_is_none(store: SqliteStore) -> None:
    assert await store.get_message("default", "nope") is None


async def test_finish_message_completed(store: SqliteStore) -> None:
    await store.add_message(record("m1"))
    await store.finish_message(
        "m1",
        Outcome(
            response="the answer",
            status=Status.COMPLETED,
            usage=Usage(prompt_tokens=12, completion_tokens=34),
            latency=1.25,
        ),
    )
    got = await store.get_message("default", "m1")
    assert got is not None
    assert got.response == "the answer"
    assert got.status is Status.COMPLETED
    assert got.usage == Usage(prompt_tokens=12, completion_tokens=34)
    assert got.latency == 1.25
    assert got.error is None
    assert got.query == "q"  # the rest is untouched
    assert got.feedback_score == -1


async def test_finish_message_failed(store: SqliteStore) -> None:
    await store.add_message(record("m1"))
    await store.finish_message(
        "m1",
        Outcome(
            response="partial",
            status=Status.FAILED,
            usage=Usage(prompt_tokens=5, completion_tokens=None),
            latency=0.75,
            error="upstream_timeout",
        ),
    )
    got = await store.get_message("default", "m1")
    assert got is not None
    assert (got.response, got.status, got.usage, got.latency, got.error) == (
        "partial",
        Status.FAILED,
        Usage(prompt_tokens=5, completion_tokens=None),
        0.75,
        "upstream_timeout",
    )


async def test_finish_message_touches_only_that_message(store: SqliteStore) -> None:
    await store.add_message(record("m1"))
    await store.add_message(record("m2"))
    await store.finish_message("m2", done("two"))
    one = await store.get_message("default", "m1")
    assert one is not None
    assert (one.response, one.status, one.latency) == ("", Status.STREAMING, None)


async def test_recent_turns_last_n_oldest_first(store: SqliteStore) -> None:
    for i in range(5):
        await add_turn(store, f"m{i}", f"q{i}", f"a{i}")
    assert await store.recent_turns("default", "c1", 3) == [
        Turn("q2", "a2"),
        Turn("q3", "a3"),
        Turn("q4", "a4"),
    ]
    assert await store.recent_turns("default", "c1", 100) == [
        Turn(f"q{i}", f"a{i}") for i in range(5)
    ]
    assert await store.recent_turns("default", "c1", 1) == [Turn("q4", "a4")]
    assert await store.recent_turns("default", "c1", 0) == []


async def test_recent_turns_skips_unreadable_turns(store: SqliteStore) -> None:
    await add_turn(store, "m0", "q0", "a0")
    await add_turn(store, "empty", "q-empty", "")  # completed, but nothing was said
    await store.add_message(record("failed", "q-failed"))
    await store.finish_message("failed", done("half", Status.FAILED, error="upstream_error"))
    await store.add_message(record("streaming", "q-streaming"))  # still running
    await store.add_message(record("cancelled", "q-cancelled"))
    await store.finish_message("cancelled", done("what they saw", Status.CANCELLED))
    await store.add_message(record("cancelled-empty", "q-ce"))
    await store.finish_message("cancelled-empty", done("", Status.CANCELLED))
    await add_turn(store, "m1", "q1", "a1")
    assert await store.recent_turns("default", "c1", 10) == [
        Turn("q0", "a0"),
        Turn("q-cancelled", "what they saw"),
        Turn("q1", "a1"),
    ]
    # The limit counts readable turns, not rows.
    assert await store.recent_turns("default", "c1", 2) == [
        Turn("q-cancelled", "what they saw"),
        Turn("q1", "a1"),
    ]


async def test_recent_turns_keeps_insertion_order_with_identical_created_at(
    store: SqliteStore,
) -> None:
    # Ids that sort differently from the insertion order, and one shared timestamp.
    ids = [f"{(i * 7919) % 1000:03d}-{i}" for i in range(60)]
    for i, message_id in enumerate(ids):
        await add_turn(store, message_id, f"q{i}", f"a{i}", created_at=1_700_000_000.0)
    assert await store.recent_turns("default", "c1", 60) == [
        Turn(f"q{i}", f"a{i}") for i in range(60)
    ]
    assert await store.recent_turns("default", "c1", 5) == [
        Turn(f"q{i}", f"a{i}") for i in range(55, 60)
    ]


async def test_recent_turns_of_one_conversation(store: SqliteStore) -> None:
    await add_turn(store, "a1", "qa1", "ra1", conversation_id="a")
    await add_turn(store, "b1", "qb1", "rb1", conversation_id="b")
    await add_turn(store, "a2", "qa2", "ra2", conversation_id="a")
    assert await store.recent_turns("default", "a", 10) == [Turn("qa1", "ra1"), Turn("qa2", "ra2")]
    assert await store.recent_turns("default", "b", 10) == [Turn("qb1", "rb1")]
    assert await store.recent_turns("default", "nope", 10) == []


async def test_tenant_scoping(store: SqliteStore) -> None:
    await add_turn(store, "m1", "secret q", "secret a", tenant="acme")
    assert await store.get_message("other", "m1") is None
    assert await store.recent_turns("other", "c1", 10) == []
    assert await store.set_feedback("other", "m1", 0, "sabotage") is None
    got = await store.get_message("acme", "m1")
    assert got is not None
    assert (got.feedback_score, got.feedback_reason) == (-1, "")
    assert await store.recent_turns("acme", "c1", 10) == [Turn("secret q", "secret a")]


async def test_set_feedback(store: SqliteStore) -> None:
    await add_turn(store, "m1", "q", "a")
    updated = await store.set_feedback("default", "m1", 87, "good, but long")
    assert updated is not None
    assert updated.message_id == "m1"
    assert updated.feedback_score == 87
    assert updated.feedback_reason == "good, but long"
    assert updated.response == "a"
    assert updated.status is Status.COMPLETED
    assert await store.get_message("default", "m1") == updated
    again = await store.set_feedback("default", "m1", 10, "")
    assert again is not None
    assert (again.feedback_score, again.feedback_reason) == (10, "")


async def test_set_feedback_unknown_id(store: SqliteStore) -> None:
    assert await store.set_feedback("default", "nope", 50, "x") is None


async def test_unicode_round_trip(store: SqliteStore) -> None:
    query = "你好\uff0c世界 😀🎉 — naïve café \U0001d518\U0001d52b\U0001d526 \u0000 nul"
    response = "こんにちは 👋🏽 العربية עברית\n\ttabs {{ 7*7 }} '; DROP TABLE messages; --"
    await store.add_message(
        record("m-é-😀", query, conversation_id="会话-1", meta={"标签": "😀"}, tenant="租户")
    )
    await store.finish_message("m-é-😀", done(response))
    got = await store.get_message("租户", "m-é-😀")
    assert got is not None
    assert got.query == query
    assert got.response == response
    assert got.conversation_id == "会话-1"
    assert got.meta == {"标签": "😀"}
    assert await store.recent_turns("租户", "会话-1", 1) == [Turn(query, response)]
    feedback = await store.set_feedback("租户", "m-é-😀", 100, "很好 👍")
    assert feedback is not None
    assert feedback.feedback_reason == "很好 👍"


async def test_a_one_megabyte_response(store: SqliteStore) -> None:
    response = ("0123456789abcdef" * 65_536)[:1_048_575] + "😀"
    assert len(response.encode()) > 1_000_000
    await store.add_message(record("big"))
    await store.finish_message("big", done(response))
    got = await store.get_message("default", "big")
    assert got is not None
    assert got.response == response
    assert await store.recent_turns("default", "c1", 1) == [Turn("q", response)]


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
    assert version == 1
    assert count == 1


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


async def test_duplicate_message_id_is_refused(store: SqliteStore) -> None:
    await store.add_message(record("m1", "first"))
    with pytest.raises(sqlite3.IntegrityError):
        await store.add_message(record("m1", "second"))
    got = await store.get_message("default", "m1")
    assert got is not None
    assert got.query == "first"


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
