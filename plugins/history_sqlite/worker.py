"""One thread for all of a SQLite connection's writes, with group commit; reads on
read-only connections of their own (WAL: a reader never waits for the writer)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from core.history import StoreUnavailable

T = TypeVar("T")
Connect = Callable[[], sqlite3.Connection]
READERS = 2  # threads reading beside the writer: one tenant's listing holds up no other read


class SqliteWorker:
    """Every write runs on one thread of its own. Writes are group-committed: those that
    arrive while a transaction is being written wait and go together in the next one, so a
    busy server commits once for many turns, not twice a turn. Reads run on the readers'
    threads, each with its own connection, when the store has them (a file; an in-memory
    database is one connection's alone, so there they share the writer's)."""

    def __init__(self) -> None:
        self._db: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chatbus-sqlite")
        self._readers: _Readers | None = None
        self._pending: list[_Write] = []
        self._writing: asyncio.Future[None] | None = None

    async def open(self, connect: Connect, connect_reader: Connect | None = None) -> None:
        """`connect` opens (and prepares) the writer's connection; `connect_reader`, when
        given, opens each reader's, once the writer's has prepared the file."""
        self._db = await self._run(connect)
        if connect_reader is not None:
            self._readers = _Readers(connect_reader)

    async def close(self) -> None:
        if self._writing is not None:
            await self._writing  # what was queued is committed before the file closes
        if self._readers is not None:
            await asyncio.to_thread(self._readers.close)
            self._readers = None
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite store is not open")
        return self._db

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await _run_on(self._thread, function, *args)

    async def read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        if self._readers is None:
            return await self._run(lambda: self.db.execute(sql, params).fetchall())
        return await _run_on(self._readers.threads, self._readers.read, sql, params)

    async def write(self, sql: str, params: Sequence[Any]) -> int:
        """Queue a statement for the next transaction; its changed-row count once committed."""
        (count,) = await self.write_many([(sql, params)])
        return count

    async def write_many(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Queue statements that must commit together: they go in the same transaction."""
        loop = asyncio.get_running_loop()
        writes = [_Write(sql, params, loop.create_future()) for sql, params in statements]
        self._pending.extend(writes)
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._commit_pending())
        return [await write.done for write in writes]

    async def run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run `function(connection)` on the store's thread, in a transaction of its own."""

        def transaction() -> T:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = function(self.db)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return result

        return await self._run(transaction)

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


async def _run_on(threads: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.get_running_loop().run_in_executor(threads, function, *args)
    except sqlite3.OperationalError as exc:  # locked past busy_timeout, disk, I/O
        raise StoreUnavailable(f"SQLite: {exc}") from None


class _Readers:
    """A few threads, each reading on a connection of its own (opened on its first read)."""

    def __init__(self, connect: Connect, count: int = READERS) -> None:
        self._connect = connect
        self.threads = ThreadPoolExecutor(count, thread_name_prefix="chatbus-sqlite-read")
        self._mine = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """On a reader's thread."""
        db: sqlite3.Connection | None = getattr(self._mine, "db", None)
        if db is None:
            db = self._mine.db = self._connect()
            with self._lock:
                self._opened.append(db)
        return db.execute(sql, params).fetchall()

    def close(self) -> None:
        """Once the reads under way are over (blocks: off the event loop)."""
        self.threads.shutdown()
        with self._lock:
            for db in self._opened:
                db.close()
            self._opened.clear()


@dataclass(frozen=True, slots=True)
class _Write:
    sql: str
    params: Sequence[Any]
    done: asyncio.Future[int]
