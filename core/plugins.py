"""The plugin manager factory: built-ins, then installed entry points, then config modules."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from core import hookspecs
from core.config import ConfigError
from core.history import HistoryStoreFactory
from core.hookspecs import PROJECT, hookimpl
from core.providers import Message, ProviderFactory

BUILTIN_PLUGINS = (
    "plugins.history_sqlite",
    "plugins.history_mongo",
    "plugins.metrics",
    "plugins.providers.echo",
    "plugins.providers.litellm",
    "plugins.providers.openai_compat",
    "plugins.transports.chatchat",
    "plugins.transports.docs",
    "plugins.transports.openai",
    "plugins.transports.webhook",
)


class CoreDefaults:
    """What happens when no plugin says otherwise."""

    @hookimpl(trylast=True)
    def prepare_messages(self, messages: list[Message]) -> list[Message]:
        return messages


def make_plugin_manager(
    modules: Iterable[str] = (), *, builtins: bool = True, entry_points: bool = True
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(CoreDefaults(), "core")
    for name in BUILTIN_PLUGINS if builtins else ():
        pm.register(importlib.import_module(name), name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(PROJECT)
        except Exception as exc:  # an installed plugin that fails to load
            raise ConfigError(f"entry point plugins ({PROJECT}): {_one_line(exc)}") from None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # not only ImportError: whatever its import raised
            raise ConfigError(
                f"plugins.modules: cannot import '{name}': {_one_line(exc)}"
            ) from None
        if not pm.is_registered(module):
            try:
                pm.register(module, name)
            except pluggy.PluginValidationError as exc:
                raise ConfigError(f"plugins.modules: '{name}': {_one_line(exc)}") from None
    try:
        pm.check_pending()  # a misspelt hook name would otherwise be ignored in silence
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r}: {_one_line(exc)}") from None
    return pm


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def provider_factories(pm: pluggy.PluginManager) -> dict[str, ProviderFactory]:
    return _collect(pm.hook.register_providers, "provider kind")


def history_store_factories(pm: pluggy.PluginManager) -> dict[str, HistoryStoreFactory]:
    return _collect(pm.hook.register_history_stores, "history store")


def _collect(hook: pluggy.HookCaller, what: str) -> dict[str, Any]:
    found: dict[str, Callable[..., Any]] = {}

    def register(name: str, factory: Callable[..., Any]) -> None:
        if name in found:
            raise ConfigError(f"{what} '{name}' is registered twice")
        found[name] = factory

    hook(register=register)
    return found
