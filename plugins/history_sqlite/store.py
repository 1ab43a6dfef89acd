"""SQLite history store: WAL, a thread of its own, group commit. Turns are ordered by an
autoincrement key, so turns in the same second (or microsecond) keep the order they were
stored in."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
INSERT = f"INSERT INTO messages ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# Turns a model may read back: answered, or cut short by the client (what they saw).
READABLE = (Status.COMPLETED, Status.CANCELLED)
T = TypeVar("T")


class SqliteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = "chatbus.db"


class SqliteStore:
    """All SQLite work runs on one thread of its own. Writes are group-committed: those
    that arrive while a transaction is being written wait and go together in the next one,
    so a busy server commits once for many turns, not twice a turn."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chatbus-sqlite")
        self._pending: list[_Write] = []
        self._writing: asyncio.Future[None] | None = None

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = await self._run(self._connect)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable across app crashes in WAL mode
        db.execute("PRAGMA busy_timeout=5000")  # several processes may share the file
        db.executescript(SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return db

    async def close(self) -> None:
        if self._writing is not None:
            await self._writing  # what was queued is committed before the file closes
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown()

    async def add_message(self, record: MessageRecord) -> None:
        row = _to_row(record)
        await self._write(INSERT, [row[column] for column in COLUMNS])

    async def finish_message(self, message_id: str, outcome: Outcome) -> None:
        await self._write(
            "UPDATE messages SET response = ?, status = ?, usage = ?, latency = ?, error = ?,"
            " model = coalesce(?, model) WHERE message_id = ?",
            (
                outcome.response,
                outcome.status,
                _usage_json(outcome.usage),
                outcome.latency,
                outcome.error,
                outcome.model,
                message_id,
            ),
        )

    async def recent_turns(self, tenant: str, conversation_id: str, limit: int) -> list[Turn]:
        rows = await self._read(
            "SELECT query, response FROM messages"
            " WHERE tenant = ? AND conversation_id = ? AND response != ''"
            f" AND status IN ({', '.join('?' * len(READABLE))})"
            " ORDER BY seq DESC LIMIT ?",
            (tenant, conversation_id, *READABLE, max(limit, 0)),
        )
        return [Turn(query, response) for query, response in reversed(rows)]

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

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite store is not open")
        return self._db

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return await self._run(lambda: self.db.execute(sql, params).fetchall())

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        """Queue a statement for the next transaction; its changed-row count once committed."""
        write = _Write(sql, params, asyncio.get_running_loop().create_future())
        self._pending.append(write)
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._commit_pending())
        return await write.done

    async def _commit_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._run(self._transaction, batch)
                except Exception as exc:  # the commit itself failed: none of them stands
                    results = [exc] * len(batch)
                for write, result in zip(batch, results, strict=True):
                    if write.done.done():
                        continue  # its caller went away; the write stands all the same
                    if isinstance(result, Exception):
                        write.done.set_exception(result)
                    else:
                        write.done.set_result(result)
        finally:
            self._writing = None

    def _transaction(self, batch: list[_Write]) -> list[int | Exception]:
        """On the store's thread: one transaction; a statement that fails fails alone."""
        results: list[int | Exception] = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for write in batch:
                try:
                    results.append(self.db.execute(write.sql, write.params).rowcount)
                except sqlite3.Error as exc:
                    results.append(exc)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return results


@dataclass(frozen=True, slots=True)
class _Write:
    sql: str
    params: Sequence[Any]
    done: asyncio.Future[int]


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
