"""The store contract (chatbus/testing/store_contract.py) on every built-in store: SQLite on
a real file, and MongoDB over TCP on a real MongoDB-compatible server (SecantusDB, started by
the suite, or the server CHATBUS_TEST_MONGODB_URI names: see README, Running the MongoDB
suite). A third-party store runs the same class with its own `store` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatbus.testing.store_contract import StoreContract
from core.history import HistoryStore
from plugins.history_mongo.store import MongoStore
from plugins.history_sqlite.store import SqliteStore
from tests.mongo_server import MongoDatabase


class TestSqliteStore(StoreContract):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[HistoryStore]:
        opened = SqliteStore(str(tmp_path / "history.db"))
        await opened.open()
        yield opened
        await opened.close()


class TestMongoStore(StoreContract):
    @pytest.fixture
    async def store(self, mongodb: MongoDatabase) -> AsyncIterator[HistoryStore]:
        from pymongo import AsyncMongoClient

        client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(
            mongodb.uri, serverSelectionTimeoutMS=5000
        )
        opened = MongoStore(client, mongodb.name)
        await opened.open()
        yield opened
        await opened.close()
