"""A real MongoDB-compatible server for the tests: SecantusDB (PyPI `secantusdb`, GPL-2.0,
a test dependency only, never imported by chatbus), started as its own process on a free
loopback port and spoken to over TCP by PyMongo, exactly as a deployment's mongod is. It
runs through tests/secantus_server.py, which aborts the transactions of a killed client
after a few seconds, as mongod does after `transactionLifetimeLimitSeconds`.

`CHATBUS_TEST_MONGODB_URI` points the same tests at a real mongod or Atlas instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tests.waiting import wait_until_blocking

URI_ENV = "CHATBUS_TEST_MONGODB_URI"
START_TIMEOUT = 30.0
LAUNCHER = Path(__file__).with_name("secantus_server.py")
# Seconds after which the server aborts a transaction left open (a killed client's): short
# here, so a crash test is not held up by it; mongod's default is 60.
TRANSACTION_LIFETIME = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MongoServer:
    """One SecantusDB process: `:memory:` storage, or a folder that outlives restarts."""

    def __init__(self, storage: Path | str = ":memory:", auth: bool = False) -> None:
        self.storage = str(storage)
        self.auth = auth
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def uri(self, credentials: str = "") -> str:
        at = f"{credentials}@" if credentials else ""
        return f"mongodb://{at}127.0.0.1:{self.port}/?directConnection=true"

    def start(self) -> MongoServer:
        argv = [sys.executable, str(LAUNCHER), "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--storage-path", self.storage]
        argv += ["--transaction-lifetime", str(TRANSACTION_LIFETIME)]
        if self.auth:
            argv.append("--auth")
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_until_it_answers()
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def _wait_until_it_answers(self) -> None:
        try:
            wait_until_blocking(self._answers, "SecantusDB answering", START_TIMEOUT, 0.05)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"SecantusDB did not answer within {START_TIMEOUT:.0f} s") from None

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            error = self.process.stderr.read().decode() if self.process.stderr else ""
            raise RuntimeError(f"SecantusDB exited {self.process.returncode}: {error[-500:]}")
        client: MongoClient[dict[str, object]] = MongoClient(
            self.uri(), serverSelectionTimeoutMS=200
        )
        try:
            client.admin.command("hello")  # answered without credentials, --auth or not
            return True
        except PyMongoError:
            return False
        finally:
            client.close()


@dataclass(frozen=True)
class MongoDatabase:
    """One test's database on the server."""

    uri: str
    name: str

    @property
    def options(self) -> dict[str, object]:
        """As `[history.mongo]` names it."""
        return {"uri": self.uri, "database": self.name}


def given_uri() -> str | None:
    return os.environ.get(URI_ENV) or None
