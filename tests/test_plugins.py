"""core.plugins: the plugin manager factory, built-ins, config modules and real entry points."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from core.config import ConfigError
from core.hookspecs import hookimpl
from core.keys import SERVICE
from core.plugins import (
    BUILTIN_PLUGINS,
    CoreDefaults,
    history_store_factories,
    make_plugin_manager,
    provider_factories,
)
from core.web import REQUEST_ID
from plugins.history_mongo import make_store as make_mongo_store
from plugins.history_sqlite import make_store
from plugins.providers.echo import make_echo
from plugins.providers.openai_compat import make_openai_compat
from tests.conftest import StartChatbus
from tests.test_cli import CHATBUS, ROOT, free_port, run, wait_until_listening


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path for real plugin modules; they are forgotten afterwards."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("chatbus_test_") or name.startswith("chatbus_ep_"):
            del sys.modules[name]


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


KIND_PLUGIN = """
from core.hookspecs import hookimpl

def make(spec, http):
    return None

@hookimpl
def register_providers(register):
    register("{kind}", make)
"""


# Built-ins


def test_builtins_are_registered() -> None:
    pm = make_plugin_manager(entry_points=False)
    for name in BUILTIN_PLUGINS:
        plugin = pm.get_plugin(name)
        assert plugin is not None, name
        assert plugin is sys.modules[name]
    assert isinstance(pm.get_plugin("core"), CoreDefaults)
    assert len(pm.get_plugins()) == len(BUILTIN_PLUGINS) + 1


def test_builtin_provider_kinds() -> None:
    factories = provider_factories(make_plugin_manager(entry_points=False))
    assert factories["echo"] is make_echo
    assert factories["openai_compat"] is make_openai_compat


def test_builtin_history_stores() -> None:
    stores = history_store_factories(make_plugin_manager(entry_points=False))
    assert stores == {"sqlite": make_store, "mongo": make_mongo_store}


def test_without_builtins_only_the_core_defaults() -> None:
    pm = make_plugin_manager(builtins=False, entry_points=False)
    assert [pm.get_name(plugin) for plugin in pm.get_plugins()] == ["core"]
    assert provider_factories(pm) == {}
    assert history_store_factories(pm) == {}


def test_each_manager_is_its_own() -> None:
    one = make_plugin_manager(builtins=False, entry_points=False)
    two = make_plugin_manager(builtins=False, entry_points=False)

    class Extra:
        @hookimpl
        def register_providers(self, register):
            register("extra", object)

    one.register(Extra())
    assert "extra" in provider_factories(one)
    assert "extra" not in provider_factories(two)


# Modules named in config


def test_config_module_is_registered(plugin_dir: Path) -> None:
    write_module(plugin_dir, "chatbus_test_kind", KIND_PLUGIN.format(kind="my_kind"))
    pm = make_plugin_manager(["chatbus_test_kind"], entry_points=False)
    assert pm.get_plugin("chatbus_test_kind") is sys.modules["chatbus_test_kind"]
    factories = provider_factories(pm)
    assert factories["my_kind"] is sys.modules["chatbus_test_kind"].make
    assert {"echo", "openai_compat", "my_kind"} <= set(factories)


def test_config_module_named_twice_is_registered_once(plugin_dir: Path) -> None:
    write_module(plugin_dir, "chatbus_test_twice", KIND_PLUGIN.format(kind="twice"))
    pm = make_plugin_manager(["chatbus_test_twice", "chatbus_test_twice"], entry_points=False)
    # Registered twice, its kind would be a ConfigError.
    builtin = provider_factories(make_plugin_manager(entry_points=False))
    assert sorted(provider_factories(pm)) == sorted([*builtin, "twice"])


def test_missing_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        make_plugin_manager(["chatbus_test_no_such_module"], entry_points=False)
    message = str(info.value)
    assert message.startswith("plugins.modules: cannot import 'chatbus_test_no_such_module'")
    assert "\n" not in message


def test_module_failing_on_import_is_a_config_error(plugin_dir: Path) -> None:
    write_module(plugin_dir, "chatbus_test_broken", "raise RuntimeError('no licence key')\n")
    with pytest.raises(ConfigError) as info:
        make_plugin_manager(["chatbus_test_broken"], entry_points=False)
    message = str(info.value)
    assert message.startswith("plugins.modules: cannot import 'chatbus_test_broken'")
    assert "no licence key" in message
    assert "\n" not in message


def test_module_with_syntax_error_is_a_config_error(plugin_dir: Path) -> None:
    write_module(plugin_dir, "chatbus_test_syntax", "def register_providers(:\n")
    with pytest.raises(ConfigError) as info:
        make_plugin_manager(["chatbus_test_syntax"], entry_points=False)
    assert str(info.value).startswith("plugins.modules: cannot import 'chatbus_test_syntax'")
    assert "\n" not in str(info.value)


def test_module_with_a_misspelt_hook_argument_is_a_config_error(plugin_dir: Path) -> None:
    write_module(
        plugin_dir,
        "chatbus_test_badarg",
        """
        from core.hookspecs import hookimpl

        @hookimpl
        def register_providers(registr):
            pass
        """,
    )
    with pytest.raises(ConfigError) as info:
        make_plugin_manager(["chatbus_test_badarg"], entry_points=False)
    message = str(info.value)
    assert message.startswith("plugins.modules: 'chatbus_test_badarg'")
    assert "registr" in message
    assert "\n" not in message


def test_kind_registered_twice_is_a_config_error(plugin_dir: Path) -> None:
    write_module(plugin_dir, "chatbus_test_dup", KIND_PLUGIN.format(kind="echo"))
    pm = make_plugin_manager(["chatbus_test_dup"], entry_points=False)
    with pytest.raises(ConfigError) as info:
        provider_factories(pm)
    assert str(info.value) == "provider kind 'echo' is registered twice"


def test_history_store_registered_twice_is_a_config_error() -> None:
    class Again:
        @hookimpl
        def register_history_stores(self, register):
            register("sqlite", make_store)

    pm = make_plugin_manager(entry_points=False)
    pm.register(Again())
    with pytest.raises(ConfigError) as info:
        history_store_factories(pm)
    assert str(info.value) == "history store 'sqlite' is registered twice"


# Entry points, from a real (if tiny) installed distribution


def install_entry_point_distribution(directory: Path) -> None:
    write_module(directory, "chatbus_ep_plugin", KIND_PLUGIN.format(kind="ep_kind"))
    dist_info = directory / "chatbus_ep_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: chatbus-ep-plugin\nVersion: 0.1\n", encoding="utf-8"
    )
    (dist_info / "entry_points.txt").write_text(
        "[chatbus]\nep = chatbus_ep_plugin\n", encoding="utf-8"
    )


def test_entry_point_plugin_is_loaded(plugin_dir: Path) -> None:
    install_entry_point_distribution(plugin_dir)
    pm = make_plugin_manager()
    assert pm.get_plugin("ep") is sys.modules["chatbus_ep_plugin"]
    factories = provider_factories(pm)
    assert factories["ep_kind"] is sys.modules["chatbus_ep_plugin"].make
    assert {"echo", "openai_compat"} <= set(factories)
    distinfo = dict((pm.get_name(plugin), dist) for plugin, dist in pm.list_plugin_distinfo())
    assert distinfo["ep"].project_name == "chatbus-ep-plugin"
    assert distinfo["ep"].version == "0.1"


def test_entry_points_can_be_left_out(plugin_dir: Path) -> None:
    install_entry_point_distribution(plugin_dir)
    pm = make_plugin_manager(entry_points=False)
    assert pm.get_plugin("ep") is None
    assert "ep_kind" not in provider_factories(pm)


def test_entry_point_module_also_named_in_config_is_registered_once(plugin_dir: Path) -> None:
    install_entry_point_distribution(plugin_dir)
    pm = make_plugin_manager(["chatbus_ep_plugin"])
    assert provider_factories(pm)["ep_kind"] is sys.modules["chatbus_ep_plugin"].make


# prepare_messages


MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "{{ 7*7 }}"},
]


def test_core_defaults_return_messages_unchanged() -> None:
    pm = make_plugin_manager(builtins=False, entry_points=False)
    messages = [dict(message) for message in MESSAGES]
    result = pm.hook.prepare_messages(request=None, messages=messages)
    assert result == MESSAGES
    assert result is messages


def test_core_defaults_directly() -> None:
    assert CoreDefaults().prepare_messages(messages=MESSAGES) is MESSAGES


def test_wrapper_prepends_a_system_message() -> None:
    class System:
        @hookimpl(wrapper=True)
        def prepare_messages(self, request, messages):
            assert request is None
            messages = yield
            return [{"role": "system", "content": "Be brief."}, *messages]

    pm = make_plugin_manager(entry_points=False)
    pm.register(System())
    result = pm.hook.prepare_messages(request=None, messages=list(MESSAGES))
    assert result == [{"role": "system", "content": "Be brief."}, *MESSAGES]


def test_two_wrappers_nest_last_registered_outermost() -> None:
    def wrapper(tag: str) -> object:
        class Tag:
            @hookimpl(wrapper=True)
            def prepare_messages(self, messages):
                messages = yield
                return [*messages, {"role": "system", "content": tag}]

        return Tag()

    pm = make_plugin_manager(builtins=False, entry_points=False)
    pm.register(wrapper("inner"))
    pm.register(wrapper("outer"))
    result = pm.hook.prepare_messages(request=None, messages=[])
    assert result == [
        {"role": "system", "content": "inner"},
        {"role": "system", "content": "outer"},
    ]


def test_a_misspelt_hook_is_a_config_error(plugin_dir: Path) -> None:
    write_module(
        plugin_dir,
        "chatbus_test_misspelt",
        "from core.hookspecs import hookimpl\n\n@hookimpl\ndef chat_complete(event):\n    pass\n",
    )
    with pytest.raises(ConfigError) as info:
        make_plugin_manager(["chatbus_test_misspelt"], entry_points=False)
    message = str(info.value)
    assert message.startswith(
        "plugin 'chatbus_test_misspelt': unknown hook 'chat_complete';"
        " did you mean 'chat_completed'? (the hooks: chat_cancelled, "
    )
    assert "\n" not in message


def test_a_function_named_like_a_hook_but_not_marked_is_warned_of(plugin_dir: Path) -> None:
    write_module(
        plugin_dir,
        "chatbus_test_unmarked",
        "from core.hookspecs import hookimpl\n\n"
        "def chat_completed(event):\n    pass\n\n"
        "@hookimpl\ndef chat_failed(event):\n    pass\n",
    )
    with structlog.testing.capture_logs() as logs:
        make_plugin_manager(["chatbus_test_unmarked"], entry_points=False)
    warned = [line for line in logs if "not marked @hookimpl" in line["event"]]
    assert warned == [
        {
            "event": "a function named like a hook is not marked @hookimpl: it is not called",
            "plugin": "chatbus_test_unmarked",
            "function": "chat_completed",
            "log_level": "warning",
        }
    ]


# --- a plugin beside the configuration, as a newcomer writes one (#16.3) -------------------

BESIDE_PLUGIN = """
from chatbus import hookimpl


@hookimpl(wrapper=True)
def prepare_messages(request, messages):
    messages = yield
    return [*messages[:-1], {**messages[-1], "content": "beside: " + messages[-1]["content"]}]
"""


def config_beside(tmp_path: Path, module: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[plugins]\nmodules = ["{module}"]\n[history.sqlite]\npath = "c.db"\n')
    return config


def test_a_plugin_file_beside_the_config_is_loaded(tmp_path: Path) -> None:
    config = config_beside(tmp_path, "chatbus_beside_plugin")
    write_module(tmp_path, "chatbus_beside_plugin", BESIDE_PLUGIN)
    result = run("--config", str(config), "chat", "hello")  # from the repository, elsewhere
    assert result.returncode == 0, result.stderr
    assert result.stdout == "beside: hello\n"


def test_a_plugin_not_found_says_where_it_looked(tmp_path: Path) -> None:
    config = config_beside(tmp_path, "chatbus_nowhere")
    result = run("--config", str(config), "chat", "hello")
    assert result.returncode == 2
    assert result.stderr == (
        f"chatbus: configuration error: {config}: plugins.modules: cannot import"
        " 'chatbus_nowhere': No module named 'chatbus_nowhere' (looked in"
        f" {tmp_path}, the configuration's folder, then the Python path of {sys.executable})\n"
    )


def test_serve_logs_the_plugins_it_loaded(tmp_path: Path) -> None:
    port = free_port()
    config = config_beside(tmp_path, "chatbus_beside_plugin")
    config.write_text(config.read_text() + f"[server]\nport = {port}\n")
    write_module(tmp_path, "chatbus_beside_plugin", BESIDE_PLUGIN)
    process = subprocess.Popen(
        [*CHATBUS, "--config", str(config), "serve"],
        cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until_listening(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=15)
    lines = {line["event"]: line for line in map(json.loads, stderr.splitlines())}
    assert lines["plugins"]["builtin"] == len(BUILTIN_PLUGINS)
    beside = str(tmp_path / "chatbus_beside_plugin.py")
    entry_points = {entry.name for entry in metadata.entry_points(group="chatbus")}
    loaded = lines["plugins"]["loaded"]
    assert f"chatbus_beside_plugin ({beside})" in loaded
    assert {item.split(" (")[0] for item in loaded} == {"chatbus_beside_plugin", *entry_points}
    assert lines["ready"]["config"] == str(config)


# --- register_middlewares and register_lifespans -----------------------------------------


class Tracing:
    """A plugin with a middleware of its own and something that lives as long as the app."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (path, request id) of each request
        self.lifespan: list[str] = []

    @hookimpl
    def register_middlewares(self, app: web.Application, register: Any) -> None:
        @web.middleware
        async def trace(request: web.Request, handler: Any) -> web.StreamResponse:
            self.seen.append((request.path, request[REQUEST_ID]))  # inside the request context
            response = await handler(request)
            response.headers["X-Traced"] = "yes"
            return response

        register(trace)

    @hookimpl
    def register_lifespans(self, app: web.Application, register: Any) -> None:
        async def lifespan(app: web.Application) -> AsyncIterator[None]:
            self.lifespan.append(f"up, service {SERVICE in app}")
            yield
            self.lifespan.append(f"down, store open {app[SERVICE].store is not None}")

        register(lifespan)


async def test_a_plugins_middleware_and_lifespan(start_chatbus: StartChatbus) -> None:
    tracing = Tracing()
    chatbus = await start_chatbus(tracing)
    async with chatbus.http.get(chatbus.url + "/models") as response:
        assert response.status == 200
        assert response.headers["X-Traced"] == "yes"
        request_id = response.headers["X-Request-Id"]
    assert tracing.seen == [("/models", request_id)]  # it ran inside the request context
    assert tracing.lifespan == ["up, service True"]
    await chatbus.close()
    assert tracing.lifespan == ["up, service True", "down, store open True"]
