"""The outbox in SQLite: a table next to the messages, claimed with a lease."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import astuple, fields
from typing import Any

from core.outbox import Delivery, DeliveryStatus
from plugins.history_sqlite.worker import SqliteWorker

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    delivery_id     TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    secret_env      TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    lease_owner     TEXT,
    lease_until     REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_attempt_at);
"""
COLUMNS = tuple(field.name for field in fields(Delivery))
INSERT = f"INSERT INTO outbox ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


# The same, only if the statement just before it changed a row (`changes()` counts the
# last statement's own rows, not a trigger's): the deliveries of a turn's end go in only
# with that end, and each insert that does so changes one row for the next.
INSERT_AFTER_A_CHANGE = (
    f"INSERT INTO outbox ({', '.join(COLUMNS)})"
    f" SELECT {', '.join('?' * len(COLUMNS))} WHERE changes() > 0"
)


def inserts(
    deliveries: Sequence[Delivery], after_a_change: bool = False
) -> list[tuple[str, Sequence[Any]]]:
    sql = INSERT_AFTER_A_CHANGE if after_a_change else INSERT
    return [(sql, _row(delivery)) for delivery in deliveries]


class SqliteOutbox:
    """The store's `outbox`: the same database, through the store's own writer."""

    def __init__(self, worker: SqliteWorker) -> None:
        self._worker = worker

    async def add_deliveries(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self._worker.write_many(inserts(deliveries))

    async def claim_deliveries(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Delivery]:
        def claim(db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                f"UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE delivery_id IN ("
                " SELECT delivery_id FROM outbox WHERE status = ? AND next_attempt_at <= ?"
                " AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_attempt_at LIMIT ?"
                f") RETURNING {', '.join(COLUMNS)}",
                (owner, lease_until, DeliveryStatus.PENDING, now, now, limit),
            ).fetchall()

        return [_delivery(row) for row in await self._worker.run(claim)]

    async def settle_delivery(self, delivery: Delivery) -> bool:
        changed = await self._worker.write(
            "UPDATE outbox SET status = ?, attempts = ?, next_attempt_at = ?, last_error = ?,"
            " lease_owner = NULL, lease_until = NULL WHERE delivery_id = ? AND lease_owner = ?",
            (delivery.status, delivery.attempts, delivery.next_attempt_at, delivery.last_error,
             delivery.delivery_id, delivery.lease_owner),
        )  # fmt: skip
        return changed == 1

    async def deliveries(self, status: DeliveryStatus | None, limit: int) -> list[Delivery]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = await self._worker.read(
            f"SELECT {', '.join(COLUMNS)} FROM outbox {where}"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [*params, max(limit, 0)],
        )
        return [_delivery(row) for row in rows]

    async def redeliver(self, delivery_id: str, now: float) -> bool:
        changed = await self._worker.write(
            "UPDATE outbox SET status = ?, attempts = 0, next_attempt_at = ?, last_error = NULL,"
            " lease_owner = NULL, lease_until = NULL WHERE delivery_id = ?",
            (DeliveryStatus.PENDING, now, delivery_id),
        )
        return changed == 1


def _row(delivery: Delivery) -> tuple[Any, ...]:
    return astuple(delivery)


def _delivery(row: Sequence[Any]) -> Delivery:
    delivery = Delivery(*row)
    delivery.status = DeliveryStatus(delivery.status)
    return delivery
