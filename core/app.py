"""The app factory and the lifecycle of what a running chatbus holds.

`open_service` builds everything a chat needs (HTTP client session, model registry, history
store, event bus) and closes it in reverse order; the aiohttp app holds it through
`cleanup_ctx`, and the CLI uses it without any HTTP server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pluggy
from aiohttp import web
from pydantic import ValidationError

from core import routes
from core.bus import EventBus
from core.chat import ChatService
from core.config import Config, ConfigError, first_problem
from core.keys import CONFIG, PLUGINS, SERVICE
from core.plugins import history_store_factories, make_plugin_manager, provider_factories
from core.registry import ModelRegistry
from core.templates import PromptTemplates
from core.web import add_request_id, request_context


def create_app(config: Config, pm: pluggy.PluginManager | None = None) -> web.Application:
    pm = pm or make_plugin_manager(config.plugins.modules)
    app = web.Application(
        middlewares=[request_context], client_max_size=config.server.max_body_bytes
    )
    app.on_response_prepare.append(add_request_id)
    app[CONFIG] = config
    app[PLUGINS] = pm
    app.cleanup_ctx.append(_service_ctx)
    routes.add_routes(app.router)
    pm.hook.register_routes(app=app, router=app.router)
    return app


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    async with open_service(app[CONFIG], app[PLUGINS]) as service:
        app[SERVICE] = service
        yield


@asynccontextmanager
async def open_service(
    config: Config, pm: pluggy.PluginManager | None = None
) -> AsyncIterator[ChatService]:
    pm = pm or make_plugin_manager(config.plugins.modules)
    prompts = PromptTemplates(config.prompts)
    stores = history_store_factories(pm)
    store_factory = stores.get(config.history.backend)
    if store_factory is None:
        raise ConfigError(
            f"history.backend: unknown store '{config.history.backend}'"
            f" (known: {', '.join(sorted(stores))})"
        )
    # Answers are long-lived streams: a pool cap would queue chats behind each other.
    connector = aiohttp.TCPConnector(limit=0)
    # Upstream APIs need no cookies; skipping the jar saves work on every request.
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as http:
        models = ModelRegistry.build(config.models, provider_factories(pm), http)
        await models.open()
        try:
            store = store_factory(config.history.options(), config.base_dir)
        except ValidationError as exc:
            raise ConfigError(first_problem(exc, f"history.{config.history.backend}")) from None
        await store.open()
        service = ChatService(
            config=config.chat,
            default_model=config.default_model,
            models=models,
            prompts=prompts,
            store=store,
            bus=EventBus(pm, config.events.timeout_seconds),
            hooks=pm.hook,
        )
        try:
            yield service
        finally:
            await service.drain()
            await store.close()
            await models.aclose()
