"""The store contract (chatbus/testing/store_contract.py) on every built-in store: SQLite on
a real file, and MongoDB over TCP on a real MongoDB-compatible server (SecantusDB, started by
the suite, or the server CHATBUS_TEST_MONGODB_URI names: see README, Running the MongoDB
suite). A third-party store runs the same class with its own `store` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from chatbus.testing.store_contract import StoreContract, record
from core.history import HistoryStore
from plugins.history_mongo.store import MongoStore
from plugins.history_mongo.summaries import BUILT
from plugins.history_sqlite.store import SqliteStore
from tests.mongo_server import MongoDatabase


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[HistoryStore]:
        opened = SqliteStore(str(tmp_path / "history.db"))
        await opened.open()
        yield opened
        await opened.close()


async def open_mongo_store(mongodb: MongoDatabase, transactions: bool | None) -> MongoStore:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
        mongodb.uri, serverSelectionTimeoutMS=5000
    )
    opened = MongoStore(client, mongodb.name, transactions=transactions)
    await opened.open()
    return opened


class TestMongoStore(StoreContract):
    """A turn's end and its deliveries in a transaction: SecantusDB is a replica set."""

    @pytest.fixture
    async def store(self, mongodb: MongoDatabase) -> AsyncIterator[HistoryStore]:
        opened = await open_mongo_store(mongodb, transactions=None)
        assert opened.transactions is True  # found out at open()
        yield opened
        await opened.close()


class TestMongoStoreWithoutTransactions(StoreContract):
    """As on a standalone mongod: a turn's end and its deliveries in three writes."""

    @pytest.fixture
    async def store(self, mongodb: MongoDatabase) -> AsyncIterator[HistoryStore]:
        opened = await open_mongo_store(mongodb, transactions=False)
        assert opened.transactions is False
        yield opened
        await opened.close()


async def test_a_mongo_database_from_before_the_summaries_gets_them_built(
    mongodb: MongoDatabase,
) -> None:
    """Turns stored before `<collection>_conversations` existed: the first start-up builds
    their summaries, once; a build a crash cut short (no mark yet) is finished."""
    first = await open_mongo_store(mongodb, transactions=None)
    try:
        for i, (conversation, query) in enumerate([("a", "a1"), ("b", "b1"), ("a", "a2")]):
            await first.add_message(
                record(f"m{i}", query, conversation_id=conversation, created_at=float(i))
            )
        await first.add_message(record("n", "none", conversation_id=""))
    finally:
        await first.close()
    expected = [("a", 2, "a1", 0.0, 2.0), ("b", 1, "b1", 1.0, 1.0)]
    await summaries_collection(mongodb, "drop")  # as before it
    assert await listed_after_opening(mongodb) == expected
    assert await listed_after_opening(mongodb) == expected  # opened again: not doubled
    await summaries_collection(mongodb, "cut short")
    assert await listed_after_opening(mongodb) == expected


async def summaries_collection(mongodb: MongoDatabase, how: str) -> None:
    """Drop the summaries, or make them look like a build that died half way."""
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb.uri)
    try:
        summaries = client[mongodb.name]["messages_conversations"]
        if how == "drop":
            await summaries.drop()
        else:
            await summaries.delete_one({"_id": BUILT})
            await summaries.delete_one({"conversation_id": "b"})
    finally:
        await client.close()


async def listed_after_opening(
    mongodb: MongoDatabase,
) -> list[tuple[str, int, str, float, float]]:
    store = await open_mongo_store(mongodb, transactions=None)
    try:
        listed = await store.conversations("default", 10, 0)
    finally:
        await store.close()
    return [(c.conversation_id, c.turns, c.first_query, c.created_at, c.updated_at)
            for c in listed]  # fmt: skip
