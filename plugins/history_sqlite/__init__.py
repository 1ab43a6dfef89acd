"""The embedded default history store: one SQLite file in WAL mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.hookspecs import hookimpl
from plugins.history_sqlite.store import SqliteOptions, SqliteStore


@hookimpl
def register_history_stores(register: Any) -> None:
    register("sqlite", make_store)


def make_store(options: dict[str, Any], base_dir: Path) -> SqliteStore:
    path = SqliteOptions.model_validate(options).path
    if path != ":memory:":
        path = str(base_dir / path)
    return SqliteStore(path)
