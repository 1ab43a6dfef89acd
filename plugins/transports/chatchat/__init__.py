"""Langchain-Chatchat 0.2.x's API, so that chatchat's own clients and webui work unchanged:
`POST /chat/chat` (chat.py), `POST /chat/feedback` (feedback.py), and the model and server
endpoints its webui calls (webui.py).

Settings, `[plugins.chatchat]`: `frames = "sse"` (chatchat 0.2.9 and later; the default) or
`"json"` (bare JSON chunks, for chatchat 0.2.0 to 0.2.8 clients).
"""

from __future__ import annotations

from aiohttp import web

from core.config import plugin_settings
from core.hookspecs import hookimpl
from core.keys import CONFIG
from plugins.transports.chatchat import webui
from plugins.transports.chatchat.chat import FRAMING, ChatchatSettings, Framing, chat
from plugins.transports.chatchat.feedback import feedback

NAME = "chatchat"  # its settings: [plugins.chatchat]


@hookimpl
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    settings = plugin_settings(app[CONFIG], NAME, ChatchatSettings)
    app[FRAMING] = Framing.of(settings.frames)
    router.add_post("/chat/chat", chat)
    router.add_post("/chat/feedback", feedback)
    webui.add_routes(router)
