"""SQLite history store (aiosqlite, WAL). Turns are ordered by an autoincrement key,
so two turns in the same second (or microsecond) keep the order they were stored in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
import orjson
from pydantic import BaseModel, ConfigDict

from core.history import MessageRecord, Outcome, Status, Turn
from core.providers import Usage

SCHEMA_VERSION = 1
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
    created_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (tenant, conversation_id, seq);
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
)
SELECT = f"SELECT {', '.join(COLUMNS)} FROM messages"
# Turns a model may read back: answered, or cut short by the client (what they saw).
READABLE = (Status.COMPLETED, Status.CANCELLED)


class SqliteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = "chatbus.db"


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(self.path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL
        await db.execute("PRAGMA busy_timeout=5000")  # several processes may share the file
        await db.executescript(SCHEMA)
        await db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        await db.commit()
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite store is not open")
        return self._db

    async def add_message(self, record: MessageRecord) -> None:
        row = _to_row(record)
        await self.db.execute(
            f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [row[column] for column in COLUMNS],
        )
        await self.db.commit()

    async def finish_message(self, message_id: str, outcome: Outcome) -> None:
        await self.db.execute(
            "UPDATE messages SET response = ?, status = ?, usage = ?, latency = ?, error = ?"
            " WHERE message_id = ?",
            (
                outcome.response,
                outcome.status,
                _usage_json(outcome.usage),
                outcome.latency,
                outcome.error,
                message_id,
            ),
        )
        await self.db.commit()

    async def recent_turns(self, tenant: str, conversation_id: str, limit: int) -> list[Turn]:
        cursor = await self.db.execute(
            "SELECT query, response FROM messages"
            " WHERE tenant = ? AND conversation_id = ? AND response != ''"
            f" AND status IN ({', '.join('?' * len(READABLE))})"
            " ORDER BY seq DESC LIMIT ?",
            (tenant, conversation_id, *READABLE, limit),
        )
        rows = await cursor.fetchall()
        return [Turn(query, response) for query, response in reversed(list(rows))]

    async def get_message(self, tenant: str, message_id: str) -> MessageRecord | None:
        cursor = await self.db.execute(
            f"{SELECT} WHERE tenant = ? AND message_id = ?", (tenant, message_id)
        )
        row = await cursor.fetchone()
        return _from_row(row) if row is not None else None

    async def set_feedback(
        self, tenant: str, message_id: str, score: int, reason: str
    ) -> MessageRecord | None:
        cursor = await self.db.execute(
            "UPDATE messages SET feedback_score = ?, feedback_reason = ?"
            " WHERE tenant = ? AND message_id = ?",
            (score, reason, tenant, message_id),
        )
        await self.db.commit()
        if cursor.rowcount == 0:
            return None
        return await self.get_message(tenant, message_id)


def _usage_json(usage: Usage | None) -> str | None:
    if usage is None:
        return None
    return orjson.dumps(
        {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    ).decode()


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
