"""The suite's MongoDB-compatible server behaves as mongod does when a client dies inside a
transaction: the transaction is aborted after its lifetime, by the server itself, and the
documents it held can be written again. SecantusDB's own daemon never does it on an idle
server (tests/secantus_server.py says why); these tests fail against it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from pymongo import MongoClient

from tests.mongo_server import TRANSACTION_LIFETIME, MongoDatabase, given_uri

pytestmark = pytest.mark.skipif(
    given_uri() is not None, reason="a given server has its own transaction lifetime"
)
SLACK = 20.0  # seconds past the lifetime: generous, the machine may be loaded
# A client that opens a transaction, writes in it, and is killed before it commits.
KILLED_IN_A_TRANSACTION = """
import os, signal, sys
from pymongo import MongoClient
client = MongoClient(sys.argv[1])
messages = client[sys.argv[2]]["messages"]
session = client.start_session()
session.start_transaction()
messages.update_one({"_id": "turn"}, {"$set": {"status": "completed"}}, session=session)
client[sys.argv[2]]["outbox"].insert_one({"_id": "delivery"}, session=session)
os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_a_client_inside_a_transaction(mongodb: MongoDatabase) -> None:
    argv = [sys.executable, "-c", KILLED_IN_A_TRANSACTION, mongodb.uri, mongodb.name]
    killed = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert killed.returncode == -9, killed.stderr.decode()[-1000:]


def test_a_killed_clients_transaction_is_aborted_after_its_lifetime(
    mongodb: MongoDatabase,
) -> None:
    bound_ms = int((TRANSACTION_LIFETIME + SLACK) * 1000)
    client: MongoClient[dict[str, object]] = MongoClient(mongodb.uri, socketTimeoutMS=bound_ms)
    try:
        messages = client[mongodb.name]["messages"]
        messages.insert_one({"_id": "turn", "status": "streaming"})
        kill_a_client_inside_a_transaction(mongodb)
        started = time.monotonic()
        # A plain write to the document the transaction held: it waits for the abort.
        result = messages.update_one({"_id": "turn"}, {"$set": {"status": "interrupted"}})
        waited = time.monotonic() - started
        assert result.modified_count == 1
        assert waited < TRANSACTION_LIFETIME + SLACK
        # Aborted, not committed: neither of its writes is there.
        assert client[mongodb.name]["outbox"].count_documents({}) == 0
        assert messages.find_one({"_id": "turn"}) == {"_id": "turn", "status": "interrupted"}
        print(f"\nwrite to the killed client's document waited {waited:.1f} s")
    finally:
        client.close()


def test_a_database_with_a_killed_clients_transaction_can_be_dropped(
    mongodb: MongoDatabase,
) -> None:
    bound_ms = int((TRANSACTION_LIFETIME + SLACK) * 1000)
    client: MongoClient[dict[str, object]] = MongoClient(mongodb.uri, socketTimeoutMS=bound_ms)
    try:
        client[mongodb.name]["messages"].insert_one({"_id": "turn", "status": "streaming"})
        kill_a_client_inside_a_transaction(mongodb)
        client.drop_database(mongodb.name)
        assert mongodb.name not in client.list_database_names()
    finally:
        client.close()
