"""The hooks chatbus calls. Each is documented in docs/plugins.md and tested.

Registration hooks run once at start-up; lifecycle hooks run once per event, in the
background, each with one frozen event object (`core.events`); they may be `async def`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pluggy
from aiohttp import web
from aiohttp.typedefs import Middleware

from core.chat_input import ChatInput
from core.config import Config
from core.events import (
    ChatCancelled,
    ChatCompleted,
    ChatFailed,
    ChatReceived,
    ChatStarted,
    Event,
    FeedbackReceived,
)
from core.history import HistoryStoreFactory
from core.outbox import Delivery
from core.providers import Message, ProviderFactory

PROJECT = "chatbus"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Subscriber = Awaitable[None] | None


@hookspec
def register_providers(register: Callable[[str, ProviderFactory], None]) -> None:
    """Add provider kinds: `register("my_kind", factory)`; config models name a kind."""


@hookspec
def register_history_stores(register: Callable[[str, HistoryStoreFactory], None]) -> None:
    """Add history stores: `register("name", factory)`; `[history] backend` picks one."""


@hookspec
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    """Add HTTP endpoints (transports and extensions)."""


# A `cleanup_ctx`-style context: set up before its `yield`, torn down after it.
Lifespan = Callable[[web.Application], AsyncIterator[None]]


@hookspec
def register_middlewares(app: web.Application, register: Callable[[Middleware], None]) -> None:
    """Add request middlewares: `register(middleware)`. They run inside chatbus's request
    context (request id, errors answered as JSON) and before the API-key check, in the order
    registered. Called once, after `register_routes`."""


@hookspec
def register_lifespans(app: web.Application, register: Callable[[Lifespan], None]) -> None:
    """Add what runs while the app serves: `register(lifespan)`, an async generator that
    sets up before its `yield` (the chat service exists by then) and tears down after it
    (before the service closes). Called once, after `register_routes`."""


@hookspec(firstresult=True)
def prepare_messages(request: ChatInput, messages: list[Message]) -> list[Message] | None:
    """Edit the messages sent to the model (`request`: what the chat asks for). Implement it
    as a wrapper:

    @hookimpl(wrapper=True)
    def prepare_messages(request, messages):
        messages = yield
        return [{"role": "system", "content": "Be brief."}, *messages]
    """


@hookspec
def check_callback(url: str, config: Config) -> str | None:
    """Why an async chat's `callback_url` cannot be called back (a sentence naming the
    problem), or None when it can. The plugin that delivers callbacks implements it, and
    others may add rules of their own: a URL any of them refuses is refused, and so is
    every URL when none implements it."""


@hookspec
def plan_deliveries(event: Event, config: Config) -> list[Delivery] | None:
    """Deliveries this event owes the outside world (webhooks). They are written to the
    store's outbox durably, with the turn's end for the end events, and delivered by the
    plugin's own worker. Called for every lifecycle event, before it is published."""


@hookspec
def chat_received(event: ChatReceived) -> Subscriber:
    """A valid chat request arrived (before anything is stored)."""


@hookspec
def chat_started(event: ChatStarted) -> Subscriber:
    """The turn is stored and the model is being called."""


@hookspec
def chat_completed(event: ChatCompleted) -> Subscriber:
    """The model finished; the whole answer is stored."""


@hookspec
def chat_failed(event: ChatFailed) -> Subscriber:
    """The model call failed; the record says `failed`."""


@hookspec
def chat_cancelled(event: ChatCancelled) -> Subscriber:
    """The client went away mid-answer; the partial answer is stored."""


@hookspec
def feedback_received(event: FeedbackReceived) -> Subscriber:
    """A client rated an answer."""
