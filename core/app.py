"""The app factory and the lifecycle of what a running chatbus holds.

`open_service` builds everything a chat needs (HTTP client session, model registry, history
store, event bus) and closes it in reverse order; the aiohttp app holds it through
`cleanup_ctx`, and the CLI uses it without any HTTP server.

Shutdown (aiohttp's `runner.cleanup()`, which SIGTERM runs): the listeners close; then
`on_shutdown` lets the answers under way finish for the grace and cuts the rest short;
aiohttp closes the connections; then the cleanup contexts run in reverse order, the
plugins' (the webhook deliverer waits for the turns' ends to be written, delivers what is
due and stops) before the service's. All of it within the grace and core/cutoff.py's
CLOSE_SECONDS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
import pluggy
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from core import auth, guards, routes
from core.bus import EventBus
from core.chat import ChatService
from core.config import Config, ConfigError
from core.cors import Cors
from core.history import HistoryStore
from core.instances import InstanceLease, new_instance_id
from core.keys import CONFIG, METRICS, PLUGINS, SERVICE
from core.plugins import history_store_factories, plugin_manager, provider_factories
from core.registry import ModelRegistry
from core.templates import PromptTemplates
from core.validation import first_problem
from core.web import add_request_id, request_context

log = structlog.get_logger("chatbus.app")


def create_app(config: Config, pm: pluggy.PluginManager | None = None) -> web.Application:
    pm = pm or plugin_manager(config)
    app = web.Application(
        middlewares=[
            request_context(config.server.access_log),
            guards.host_guard(config),
            auth.middleware(config.auth),
            guards.body_guard(config),
        ],
        client_max_size=config.server.max_body_bytes,
    )
    app.on_response_prepare.append(add_request_id)
    if config.server.cors_origins:
        cors = Cors(config)
        app.middlewares.insert(2, cors.preflight)  # after the Host guard, before the key check
        app.on_response_prepare.append(cors.add_headers)
    app[CONFIG] = config
    app[METRICS] = CollectorRegistry()
    app[PLUGINS] = pm
    app.cleanup_ctx.append(_service_ctx)
    app.on_shutdown.append(_stop_answering)
    routes.add_routes(app.router)
    pm.hook.register_routes(app=app, router=app.router)
    added: list[Middleware] = []
    pm.hook.register_middlewares(app=app, register=added.append)
    app.middlewares[1:1] = added  # inside the request context, before the API-key check
    pm.hook.register_lifespans(app=app, register=app.cleanup_ctx.append)
    return app


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_service(app[CONFIG], app[PLUGINS]) as service:
        app[SERVICE] = service
        yield


async def _stop_answering(app: web.Application) -> None:
    await app[SERVICE].cutoff.stop_answering()


@asynccontextmanager
async def open_service(
    config: Config, pm: pluggy.PluginManager | None = None
) -> AsyncIterator[ChatService]:
    pm = pm or plugin_manager(config)
    prompts = PromptTemplates(config.prompts)
    async with AsyncExitStack() as stack:
        # Answers are long-lived streams: a pool cap would queue chats behind each other.
        # Upstream APIs need no cookies; skipping the jar saves work on every request.
        http = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
            )
        )
        models = ModelRegistry.build(config.models, provider_factories(pm), http)
        store = make_store(config, pm)
        stack.push_async_callback(models.aclose)
        await models.open()
        stack.push_async_callback(store.close)
        await store.open()
        service = ChatService(
            config=config,
            models=models,
            prompts=prompts,
            store=store,
            bus=EventBus(pm, config.events.timeout_seconds),
            hooks=pm.hook,
            instance_id=new_instance_id(),
        )
        lease = InstanceLease(service, config.history)
        stack.push_async_callback(lease.stop)  # after the drain: the turns' ends are written
        await lease.start()
        try:
            yield service
        finally:
            await service.recorder.drain(service.cutoff.time_left())


def make_store(config: Config, pm: pluggy.PluginManager) -> HistoryStore:
    backend = config.history.backend
    stores = history_store_factories(pm)
    if backend not in stores:
        raise ConfigError(
            f"history.backend: unknown store '{backend}' (known: {', '.join(sorted(stores))})"
        )
    try:
        return stores[backend](config.history.options(), config.base_dir)
    except ValidationError as exc:
        raise ConfigError(first_problem(exc, f"history.{backend}")) from None
    except ValueError as exc:
        raise ConfigError(f"history.{backend}: {exc}") from None
