"""The plugin manager factory: built-ins, then installed entry points, then config modules."""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import structlog

from core import hookspecs
from core.config import Config, ConfigError
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
log = structlog.get_logger("chatbus.plugins")


class CoreDefaults:
    """What happens when no plugin says otherwise."""

    @hookimpl(trylast=True)
    def prepare_messages(self, messages: list[Message]) -> list[Message]:
        return messages


def make_plugin_manager(
    modules: Iterable[str] = (),
    *,
    builtins: bool = True,
    entry_points: bool = True,
    search_dir: Path | None = None,
) -> pluggy.PluginManager:
    """`modules` are imported from `search_dir` (the config file's folder) first, then from
    the Python path."""
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
        module = _import_config_module(name, search_dir)
        if not pm.is_registered(module):
            try:
                pm.register(module, name)
            except pluggy.PluginValidationError as exc:
                raise ConfigError(f"plugins.modules: '{name}': {_one_line(exc)}") from None
    _check_hook_names(pm)
    _warn_of_unmarked_hooks(pm)
    return pm


def plugin_manager(config: Config) -> pluggy.PluginManager:
    """The plugin manager a configuration asks for: its modules looked for beside it first."""
    return make_plugin_manager(config.plugins.modules, search_dir=config.base_dir)


def _import_config_module(name: str, search_dir: Path | None) -> ModuleType:
    """A module beside the configuration is found as a script's neighbours are: its folder
    goes first on the import path."""
    if search_dir is not None and str(search_dir) not in sys.path:
        sys.path.insert(0, str(search_dir))
    try:
        return importlib.import_module(name)
    except Exception as exc:  # not only ImportError: whatever its import raised
        problem = _one_line(exc)
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (name == missing or name.startswith(missing + ".")):
            beside = f"{search_dir}, the configuration's folder, then " if search_dir else ""
            problem += f" (looked in {beside}the Python path of {sys.executable})"
        raise ConfigError(f"plugins.modules: cannot import '{name}': {problem}") from None


def _hook_names(pm: pluggy.PluginManager) -> list[str]:
    return [name for name in vars(pm.hook) if not name.startswith("_")]


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """A `@hookimpl` whose name is no hook would never be called: refuse it, and say which
    hook it may have meant. (pluggy's `check_pending`, with a suggestion.)"""
    names = _hook_names(pm)
    known = [name for name in names if getattr(pm.hook, name).has_spec()]
    for name in names:
        hook: pluggy.HookCaller = getattr(pm.hook, name)
        if hook.has_spec():
            continue
        for impl in hook.get_hookimpls():
            if not impl.optionalhook:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"plugin '{impl.plugin_name}': unknown hook '{name}'{hint}"
                    f" (the hooks: {', '.join(sorted(known))})"
                )


def _warn_of_unmarked_hooks(pm: pluggy.PluginManager) -> None:
    """A function named like a hook but not marked `@hookimpl` is not called: say so."""
    hooks = [name for name in _hook_names(pm) if getattr(pm.hook, name).has_spec()]
    for plugin_name, plugin in pm.list_name_plugin():
        for hook in hooks:
            marked = pm.parse_hookimpl_opts(plugin, hook) is not None
            if callable(getattr(plugin, hook, None)) and not marked:
                log.warning(
                    "a function named like a hook is not marked @hookimpl: it is not called",
                    plugin=plugin_name,
                    function=hook,
                )


def extra_plugins(pm: pluggy.PluginManager) -> list[str]:
    """The plugins loaded besides chatbus's own (entry points, config modules), each with
    where it came from, for the start-up log."""
    loaded = []
    for name, plugin in pm.list_name_plugin():
        if name == "core" or name in BUILTIN_PLUGINS:
            continue
        where = getattr(plugin, "__file__", None) or type(plugin).__name__
        loaded.append(f"{name} ({where})")
    return loaded


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
