"""Fixtures: a fake upstream and a real chatbus server, both on loopback."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from chatbus.testing.fake_upstream import FakeUpstream
from core.app import create_app
from core.config import Config
from core.events import Event
from core.history import HistoryStore
from core.hookspecs import hookimpl
from core.keys import SERVICE
from core.plugins import make_plugin_manager
from core.server import start
from tests.mongo_server import MongoDatabase, MongoServer, given_uri
from tests.sse import Stream, read_sse

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class EventRecorder:
    """A plugin subscribed to every lifecycle event."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = asyncio.Event()

    def _record(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()

    @hookimpl
    def chat_received(self, event: Event) -> None:
        self._record(event)

    @hookimpl
    def chat_started(self, event: Event) -> None:
        self._record(event)

    @hookimpl
    def chat_completed(self, event: Event) -> None:
        self._record(event)

    @hookimpl
    def chat_failed(self, event: Event) -> None:
        self._record(event)

    @hookimpl
    def chat_cancelled(self, event: Event) -> None:
        self._record(event)

    @hookimpl
    def feedback_received(self, event: Event) -> None:
        self._record(event)

    def of(self, hook: str) -> list[Event]:
        return [event for event in self.events if event.hook == hook]

    async def wait_for(self, hook: str, count: int = 1) -> list[Event]:
        """Wait (5 s at most) until `count` events of `hook` arrived."""
        async with asyncio.timeout(5):
            while len(self.of(hook)) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.of(hook)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture
def callback_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callbacks are allowed only with their signing secret set (the default variable)."""
    monkeypatch.setenv("CHATBUS_CALLBACK_SECRET", "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0")


def webhook_settings(**settings: Any) -> dict[str, Any]:
    """Config for the webhook plugin's `[plugins.webhooks]` table, to merge into a test's."""
    return {"plugins": {"webhooks": settings}}


def make_config(tmp_path: Path, upstream: FakeUpstream | None = None, **extra: Any) -> Config:
    models: dict[str, Any] = {"echo": {"provider": "echo"}}
    if upstream is not None:
        models["fake"] = {
            "provider": "openai_compat",
            "base_url": upstream.base_url,
            "model": "fake-model",
            "read_timeout": 5,
            "retry_backoff": 0.01,  # retries stay on, and quick
        }
    data = {
        "default_model": "echo",
        "models": models,
        "history": {"backend": "sqlite", "sqlite": {"path": "chat.db"}},
        "prompts": {"default": "{{ input }}", "py": "Code: {{ input }}"},
        "server": {"shutdown_grace_seconds": 1.0},
        "base_dir": tmp_path,
    }
    return Config.model_validate(deep_merge(data, extra))


@dataclass
class Chatbus:
    """A running chatbus on loopback and a client session to talk to it."""

    url: str
    app: web.Application
    http: aiohttp.ClientSession
    events: EventRecorder
    runner: web.AppRunner
    closed: bool = field(default=False)

    @property
    def store(self) -> HistoryStore:
        return self.app[SERVICE].store

    def post(self, path: str, body: Any) -> Any:
        return self.http.post(self.url + path, json=body)

    async def chat(self, **body: Any) -> Stream:
        """POST /chat/chat with stream=true and parse the event stream."""
        async with self.post("/chat/chat", {"stream": True, **body}) as response:
            return await read_sse(response)

    async def chat_json(self, **body: Any) -> tuple[int, dict[str, Any]]:
        async with self.post("/chat/chat", {"stream": False, **body}) as response:
            return response.status, await response.json()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.http.close()
            await self.runner.cleanup()


StartChatbus = Callable[..., Awaitable[Chatbus]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """The store `start_chatbus` runs on: SQLite, or each store in turn for tests marked
    `both_stores` (see pytest_generate_tests)."""
    return str(getattr(request, "param", "sqlite"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_stores` that start a chatbus run on SQLite and on MongoDB, unless
    a test names its store itself (`parametrize("store_backend", ..., indirect=True)`)."""
    marks = metafunc.definition.iter_markers("parametrize")
    named = any("store_backend" in str(mark.args[0]) for mark in marks)
    wanted = metafunc.definition.get_closest_marker("both_stores") is not None
    if wanted and not named and "store_backend" in metafunc.fixturenames:
        metafunc.parametrize("store_backend", ["sqlite", "mongo"], indirect=True)


@pytest.fixture
async def start_chatbus(
    tmp_path: Path, upstream: FakeUpstream, store_backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[StartChatbus]:
    """Start a chatbus with `make_config` plus overrides and extra plugins, on the store
    `store_backend` names (MongoDB: a fresh database on the suite's server)."""
    started: list[Chatbus] = []
    on_store: dict[str, Any] = {}
    if store_backend == "mongo":
        mongodb: MongoDatabase = request.getfixturevalue("mongodb")
        on_store = {"history": {"backend": "mongo", "mongo": mongodb.options}}

    async def starter(*plugins: object, **overrides: Any) -> Chatbus:
        config = make_config(tmp_path, upstream, **deep_merge(on_store, overrides))
        pm = make_plugin_manager(config.plugins.modules)
        recorder = EventRecorder()
        for plugin in (recorder, *plugins):
            pm.register(plugin)
        app = create_app(config, pm)
        runner = await start(app, "127.0.0.1", 0)
        port = runner.addresses[0][1]
        http = aiohttp.ClientSession()
        bus = Chatbus(f"http://127.0.0.1:{port}", app, http, recorder, runner)
        started.append(bus)
        return bus

    yield starter
    for bus in started:
        await bus.close()


@pytest.fixture
async def chatbus(start_chatbus: StartChatbus) -> Chatbus:
    return await start_chatbus()


@pytest.fixture(scope="session")
def mongodb_server_uri() -> Iterator[str]:
    """A MongoDB-compatible server for the whole run: CHATBUS_TEST_MONGODB_URI's, or a
    SecantusDB process started here (tests/mongo_server.py)."""
    given = given_uri()
    if given is not None:
        yield given
        return
    server = MongoServer().start()
    try:
        yield server.uri()
    finally:
        server.stop()


@pytest.fixture
def mongodb(mongodb_server_uri: str) -> Iterator[MongoDatabase]:
    """A fresh database on that server, dropped afterwards."""
    from pymongo import MongoClient

    database = MongoDatabase(mongodb_server_uri, f"chatbus_test_{uuid.uuid4().hex[:12]}")
    yield database
    client: MongoClient[dict[str, object]] = MongoClient(mongodb_server_uri)
    try:
        client.drop_database(database.name)
    finally:
        client.close()
