"""Typed keys for what the aiohttp app holds; routes and plugins read them."""

from __future__ import annotations

import pluggy
from aiohttp import web
from prometheus_client import CollectorRegistry

from core.chat import ChatService
from core.config import Config

CONFIG = web.AppKey("config", Config)
PLUGINS = web.AppKey("plugins", pluggy.PluginManager)
SERVICE = web.AppKey("chat_service", ChatService)
# The app's own Prometheus registry (no process-global one): plugins add their metrics to
# it, and GET /metrics serves it.
METRICS = web.AppKey("metrics_registry", CollectorRegistry)
