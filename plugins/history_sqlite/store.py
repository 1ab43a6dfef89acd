"""SQLite history store (WAL). Turns are ordered by an autoincrement key, so turns in the
same second (or microsecond) keep the order they were stored in."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from core.history import (
    READABLE,
    Conversation,
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

SCHEMA_VERSION = 2  # 2: messages.instance_id, and the instances' leases
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
        await self._worker.open(self._connect)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
        db.execute("PRAGMA busy_timeout=5000")  # several processes may share the file
        (version,) = db.execute("PRAGMA user_version").fetchone()
        db.executescript(SCHEMA)
        if version == 1:  # a file from before leases
            db.execute(ADD_INSTANCE_ID)
        db.executescript(STREAMING_INDEX)
        db.executescript(outbox.SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return db

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
            " model = coalesce(?, model), meta = json_patch(meta, ?) WHERE message_id = ?",
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
        await self._worker.write_many([update, *outbox.inserts(deliveries)])

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

    async def conversations(self, tenant: str, limit: int, offset: int) -> list[Conversation]:
        rows = await self._read(
            "SELECT conversation_id, count(*), min(created_at), max(created_at),"
            " (SELECT query FROM messages AS first WHERE first.tenant = m.tenant"
            "  AND first.conversation_id = m.conversation_id ORDER BY seq LIMIT 1)"
            " FROM messages AS m WHERE tenant = ? AND conversation_id != ''"
            " GROUP BY conversation_id ORDER BY max(seq) DESC LIMIT ? OFFSET ?",
            (tenant, max(limit, 0), max(offset, 0)),
        )
        return [
            Conversation(conversation_id, turns, first_query, created, updated)
            for conversation_id, turns, created, updated, first_query in rows
        ]

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
