"""SQLite history store (WAL). Turns are ordered by an autoincrement key, so turns in the
same second (or microsecond) keep the order they were stored in."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from core.history import (
    READABLE,
    Conversation,
    ListingKey,
    MessageRecord,
    Outcome,
    Status,
    Turn,
)
from core.outbox import Delivery
from core.providers import Usage
from plugins.history_sqlite import outbox
from plugins.history_sqlite.outbox import SqliteOutbox
from plugins.history_sqlite.worker import SqliteWorker

SCHEMA_VERSION = 3  # 2: messages.instance_id, and the instances' leases; 3: conversations
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    tenant          TEXT NOT NULL,
    chat_type       TEXT NOT NULL,
    query           TEXT NOT NULL,
    response        TEXT NOT NULL DEFAULT '',
    status          TEXT NOT NULL,
    model           TEXT NOT NULL,
    usage           TEXT,
    latency         REAL,
    error           TEXT,
    feedback_score  INTEGER NOT NULL DEFAULT -1,
    feedback_reason TEXT NOT NULL DEFAULT '',
    meta            TEXT NOT NULL DEFAULT '{}',
    created_at      REAL NOT NULL,
    instance_id     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (tenant, conversation_id, seq);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    lease_until REAL NOT NULL
);
"""
# Only the turns under way: each instance looks for orphaned ones every few seconds, and a
# turn leaves this index when it ends. (Written after the migration: it names instance_id.)
STREAMING_INDEX = """
CREATE INDEX IF NOT EXISTS messages_streaming ON messages (instance_id)
    WHERE status = 'streaming';
"""
ADD_INSTANCE_ID = "ALTER TABLE messages ADD COLUMN instance_id TEXT NOT NULL DEFAULT ''"
# A summary row a conversation, kept by triggers in the very statement that adds or deletes
# a turn: listing reads a page of it, not every turn. (Ending a turn changes none of it.)
# Turns are deleted a conversation at a time (`delete_conversation`), so a delete only
# counts down; the row goes with the conversation's last turn.
CONVERSATIONS = (
    """CREATE TABLE IF NOT EXISTS conversations (
        tenant          TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        turns           INTEGER NOT NULL,
        first_query     TEXT NOT NULL,
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        last_seq        INTEGER NOT NULL,
        PRIMARY KEY (tenant, conversation_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS conversations_by_activity"
    " ON conversations (tenant, last_seq, conversation_id)",
    """CREATE TRIGGER IF NOT EXISTS conversations_on_insert AFTER INSERT ON messages
    WHEN new.conversation_id != '' BEGIN
        INSERT INTO conversations VALUES (new.tenant, new.conversation_id, 1, new.query,
            new.created_at, new.created_at, new.seq)
        ON CONFLICT (tenant, conversation_id) DO UPDATE SET turns = turns + 1,
            created_at = min(created_at, excluded.created_at),
            updated_at = max(updated_at, excluded.updated_at),
            last_seq = max(last_seq, excluded.last_seq);
    END""",
    """CREATE TRIGGER IF NOT EXISTS conversations_on_delete AFTER DELETE ON messages
    WHEN old.conversation_id != '' BEGIN
        UPDATE conversations SET turns = turns - 1
            WHERE tenant = old.tenant AND conversation_id = old.conversation_id;
        DELETE FROM conversations
            WHERE tenant = old.tenant AND conversation_id = old.conversation_id AND turns <= 0;
    END""",
)
# A file from before the table: its rows built from the turns, once, as the triggers would.
BUILD_CONVERSATIONS = """
INSERT INTO conversations
SELECT tenant, conversation_id, count(*),
    (SELECT query FROM messages AS first WHERE first.tenant = m.tenant
        AND first.conversation_id = m.conversation_id ORDER BY seq LIMIT 1),
    min(created_at), max(created_at), max(seq)
FROM messages AS m WHERE conversation_id != '' GROUP BY tenant, conversation_id
"""
COLUMNS = (
    "message_id",
    "conversation_id",
    "tenant",
    "chat_type",
    "query",
    "response",
    "status",
    "model",
    "usage",
    "latency",
    "error",
    "feedback_score",
    "feedback_reason",
    "meta",
    "created_at",
    "instance_id",
)
SELECT = f"SELECT {', '.join(COLUMNS)} FROM messages"
INSERT = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


OPEN_SECONDS = 10.0  # how long an opening refused a lock is tried again


class SqliteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = "chatbus.db"


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._worker = SqliteWorker()
        self.outbox = SqliteOutbox(self._worker)
        self._read = self._worker.read
        self._write = self._worker.write

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        in_memory = self.path == ":memory:"  # one connection's alone: no readers of its own
        await self._worker.open(self._connect, None if in_memory else self._connect_reader)

    def _connect_reader(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA query_only=ON")
        db.execute("PRAGMA busy_timeout=5000")  # rarely busy in WAL; then wait as the writer
        return db

    def _connect(self) -> sqlite3.Connection:
        """The writer's connection, the schema made or migrated. SQLite refuses at once,
        without its busy wait, a lock it could only give by risking a deadlock; instances
        opening one file together have met that ("database is locked", once in a full
        suite, never reproduced by hand): the opening is tried again until OPEN_SECONDS."""
        deadline = time.monotonic() + OPEN_SECONDS
        while True:
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05 + random.random() * 0.1)  # apart from the other opener

    def _connect_once(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._make_schema(db)
        except BaseException:
            db.close()
            raise
        return db

    def _make_schema(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
        db.execute("PRAGMA busy_timeout=5000")  # several processes may share the file
        (version,) = db.execute("PRAGMA user_version").fetchone()
        db.executescript(SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
        if version == 1 and "instance_id" not in columns:  # a file from before leases
            db.execute(ADD_INSTANCE_ID)
        db.executescript(STREAMING_INDEX)
        db.executescript(outbox.SCHEMA)
        _add_conversations(db)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        await self._worker.close()

    async def add_message(self, record: MessageRecord) -> None:
        row = _to_row(record)
        await self._write(INSERT, [row[column] for column in COLUMNS])

    async def finish_message(
        self, message_id: str, outcome: Outcome, deliveries: Sequence[Delivery] = ()
    ) -> None:
        update = (
            "UPDATE messages SET response = ?, status = ?, usage = ?, latency = ?, error = ?,"
            " model = coalesce(?, model), meta = json_patch(meta, ?)"
            f" WHERE message_id = ? AND status = '{Status.STREAMING}'",
            (
                outcome.response,
                outcome.status,
                _usage_json(outcome.usage),
                outcome.latency,
                outcome.error,
                outcome.model,
                orjson.dumps(outcome.answer_meta()).decode(),
                message_id,
            ),
        )
        # A turn ends once: over one another instance ended first (it found this one's
        # lease expired), this end is dropped, and its deliveries with it.
        await self._worker.write_many([update, *outbox.inserts(deliveries, after_a_change=True)])

    async def recent_turns(self, tenant: str, conversation_id: str, limit: int) -> list[Turn]:
        # A turn that answered with tool calls alone has no text, and is history too.
        rows = await self._read(
            "SELECT query, response, meta FROM messages"
            " WHERE tenant = ? AND conversation_id = ?"
            " AND (response != '' OR json_extract(meta, '$.tool_calls') IS NOT NULL)"
            f" AND status IN ({', '.join('?' * len(READABLE))})"
            " ORDER BY seq DESC LIMIT ?",
            (tenant, conversation_id, *READABLE, max(limit, 0)),
        )
        return [
            Turn.of(query, response, orjson.loads(meta)) for query, response, meta in reversed(rows)
        ]

    async def get_message(self, tenant: str, message_id: str) -> MessageRecord | None:
        rows = await self._read(
            f"{SELECT} WHERE tenant = ? AND message_id = ?", (tenant, message_id)
        )
        return _from_row(rows[0]) if rows else None

    async def set_feedback(
        self, tenant: str, message_id: str, score: int, reason: str
    ) -> MessageRecord | None:
        changed = await self._write(
            "UPDATE messages SET feedback_score = ?, feedback_reason = ?"
            " WHERE tenant = ? AND message_id = ?",
            (score, reason, tenant, message_id),
        )
        return await self.get_message(tenant, message_id) if changed else None

    async def ping(self) -> None:
        await self._read("SELECT 1", ())

    async def conversations(
        self, tenant: str, limit: int, offset: int, after: ListingKey | None = None
    ) -> list[Conversation]:
        # Past the key: a row value, so that the index's range starts just after it.
        past, key = ("", ()) if after is None else (
            " AND (last_seq, conversation_id) < (?, ?)", (after.last_seq, after.conversation_id)
        )  # fmt: skip
        rows = await self._read(
            "SELECT conversation_id, turns, first_query, created_at, updated_at, last_seq"
            f" FROM conversations WHERE tenant = ?{past}"
            " ORDER BY last_seq DESC, conversation_id DESC LIMIT ? OFFSET ?",
            (tenant, *key, max(limit, 0), max(offset, 0)),
        )
        return [Conversation(*row) for row in rows]

    async def messages(
        self, tenant: str, conversation_id: str, limit: int, offset: int
    ) -> list[MessageRecord]:
        rows = await self._read(
            f"{SELECT} WHERE tenant = ? AND conversation_id = ? ORDER BY seq LIMIT ? OFFSET ?",
            (tenant, conversation_id, max(limit, 0), max(offset, 0)),
        )
        return [_from_row(row) for row in rows]

    async def delete_conversation(self, tenant: str, conversation_id: str) -> int:
        return await self._write(
            "DELETE FROM messages WHERE tenant = ? AND conversation_id = ?",
            (tenant, conversation_id),
        )

    async def save_partial(self, message_id: str, response: str) -> None:
        await self._write(
            "UPDATE messages SET response = ? WHERE message_id = ? AND status = ?",
            (response, message_id, Status.STREAMING),
        )

    async def keep_lease(self, instance_id: str, now: float, lease_until: float) -> None:
        await self._worker.write_many(
            [
                (
                    "INSERT INTO instances (instance_id, lease_until) VALUES (?, ?)"
                    " ON CONFLICT (instance_id) DO UPDATE SET lease_until = excluded.lease_until",
                    (instance_id, lease_until),
                ),
                ("DELETE FROM instances WHERE lease_until < ?", (now,)),
            ]
        )

    async def claim_orphaned_turns(
        self, instance_id: str, now: float, limit: int
    ) -> list[MessageRecord]:
        # One statement: the instances it reads are those of the moment it hands turns over.
        # The status is written out, not bound, so that the partial index serves it.
        def claim(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                f"UPDATE messages SET instance_id = ? WHERE seq IN (SELECT seq FROM messages"
                f" WHERE status = '{Status.STREAMING}' AND instance_id NOT IN"
                " (SELECT instance_id FROM instances WHERE lease_until >= ?)"
                f" ORDER BY seq LIMIT ?) RETURNING {', '.join(COLUMNS)}",
                (instance_id, now, max(limit, 0)),
            ).fetchall()

        rows = await self._worker.run(claim)
        return sorted((_from_row(row) for row in rows), key=lambda record: record.created_at)


def _add_conversations(db: sqlite3.Connection) -> None:
    """The conversations table and its triggers, built from the turns of a file from before
    them: in one transaction, so that processes opening the file together build it once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version < SCHEMA_VERSION:
            for statement in CONVERSATIONS:
                db.execute(statement)
            db.execute(BUILD_CONVERSATIONS)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _usage_json(usage: Usage | None) -> str | None:
    if usage is None:
        return None
    return orjson.dumps(usage.counts()).decode()


def _to_row(record: MessageRecord) -> dict[str, Any]:
    row = {column: getattr(record, column) for column in COLUMNS}
    row["usage"] = _usage_json(record.usage)
    row["meta"] = orjson.dumps(record.meta).decode()
    return row


def _from_row(row: Any) -> MessageRecord:
    values = dict(zip(COLUMNS, row, strict=True))
    values["status"] = Status(values["status"])
    values["usage"] = Usage(**orjson.loads(values["usage"])) if values["usage"] else None
    values["meta"] = orjson.loads(values["meta"])
    return MessageRecord(**values)
