"""The production history store: MongoDB through PyMongo's async API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.hookspecs import hookimpl

if TYPE_CHECKING:
    from plugins.history_mongo.store import MongoStore

DEFAULT_URI = "mongodb://127.0.0.1:27017"


class MongoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    uri: str | None = Field(None, description="a URI without a password, or use uri_env")
    uri_env: str | None = Field(None, description="environment variable holding the URI")
    database: str = "chatbus"
    collection: str = "messages"
    server_selection_timeout: float = Field(2.0, gt=0, description="seconds to find a server")
    connect_timeout: float = Field(2.0, gt=0)
    operation_timeout: float = Field(5.0, gt=0, description="seconds to wait for a reply")
    # "auto": a turn's end and its deliveries in one transaction where the deployment has
    # them (a replica set, a sharded cluster); else, or with false, in three writes that a
    # crash between cannot split (the deliveries held, released once the end names them).
    transactions: Literal["auto", False] = "auto"

    @model_validator(mode="after")
    def _one_uri(self) -> MongoOptions:
        if self.uri and self.uri_env:
            raise ValueError("uri and uri_env: give one, not both")
        return self

    def resolved_uri(self) -> str:
        if self.uri_env:
            uri = os.environ.get(self.uri_env)
            if not uri:
                raise ValueError(f"uri_env: the environment variable {self.uri_env} is not set")
            return uri
        return self.uri or DEFAULT_URI


@hookimpl
def register_history_stores(register: Any) -> None:
    register("mongo", make_store)


def make_store(options: dict[str, Any], base_dir: Path) -> MongoStore:
    # Imported here: a deployment on the SQLite store never loads the MongoDB driver.
    from pymongo import AsyncMongoClient

    from plugins.history_mongo.store import MongoStore

    settings = MongoOptions.model_validate(options)
    client: Any = AsyncMongoClient(
        settings.resolved_uri(),
        serverSelectionTimeoutMS=int(settings.server_selection_timeout * 1000),
        connectTimeoutMS=int(settings.connect_timeout * 1000),
        # Not timeoutMS: it would also override serverSelectionTimeoutMS, and an outage must
        # be told quickly (a 503), not after the whole operation budget.
        socketTimeoutMS=int(settings.operation_timeout * 1000),
        tz_aware=True,
    )
    transactions = None if settings.transactions == "auto" else False
    return MongoStore(client, settings.database, settings.collection, transactions)
