"""core.config: a real TOML file, environment overrides, one-line errors, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.app import open_service
from core.auth import check_exposure
from core.chat import Caller
from core.chat_input import ChatInput
from core.config import ConfigError
from core.config_sources import load_config, misnamed_overrides
from plugins.providers.echo import EchoOptions

REPO = Path(__file__).parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    message = str(info.value)
    assert "\n" not in message
    return message


# Defaults and files


def test_builtin_defaults_when_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {})
    assert config.default_model == "echo"
    assert list(config.models) == ["echo"]
    assert config.models["echo"].provider == "echo"
    assert config.models["echo"].options() == {}
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 7861
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert config.server.shutdown_grace_seconds == 30.0
    assert config.chat.max_query_chars == 32_000
    assert config.chat.max_history_turns == 100
    assert config.chat.keepalive_seconds == 15.0
    assert config.chat.default_history_len == 10
    assert config.history.backend == "sqlite"
    assert config.history.options() == {}
    assert config.prompts == {"default": "{{ input }}"}
    assert config.events.timeout_seconds == 10.0
    assert config.plugins.modules == []
    assert config.base_dir.resolve() == tmp_path.resolve()


def test_config_toml_in_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "config.toml", "[server]\nport = 9100\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {})
    assert config.server.port == 9100
    assert config.base_dir == tmp_path.resolve()


def test_values_from_a_file(tmp_path: Path) -> None:
    file = write(
        tmp_path / "chatbus.toml",
        """
default_model = "local"

[server]
host = "0.0.0.0"
port = 9001

[chat]
max_query_chars = 500
keepalive_seconds = 2.5

[history]
backend = "sqlite"

[history.sqlite]
path = "data/chat.db"

[events]
timeout_seconds = 3

[plugins]
modules = ["my_company.guardrails"]

[prompts]
default = "{{ input }}"
short = "Briefly: {{ input }}"

[models.echo]
provider = "echo"

[models.local]
provider = "openai_compat"
base_url = "http://127.0.0.1:8000/v1"
model = "Qwen2.5-7B-Instruct"
read_timeout = 30
""",
    )
    config = load_config(file, {})
    assert config.default_model == "local"
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9001
    assert config.server.max_body_bytes == 8 * 1024 * 1024  # untouched default
    assert config.chat.max_query_chars == 500
    assert config.chat.keepalive_seconds == 2.5
    assert config.chat.max_history_turns == 100
    assert config.history.backend == "sqlite"
    assert config.history.options() == {"path": "data/chat.db"}
    assert config.events.timeout_seconds == 3.0
    assert config.plugins.modules == ["my_company.guardrails"]
    assert config.prompts == {"default": "{{ input }}", "short": "Briefly: {{ input }}"}
    assert sorted(config.models) == ["echo", "local"]
    assert config.models["local"].provider == "openai_compat"
    assert config.models["local"].options() == {
        "base_url": "http://127.0.0.1:8000/v1",
        "model": "Qwen2.5-7B-Instruct",
        "read_timeout": 30,
    }


def test_base_dir_is_the_directory_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "elsewhere").mkdir()
    file = write(tmp_path / "etc" / "chatbus.toml", "")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert load_config(file, {}).base_dir == (tmp_path / "etc").resolve()
    # A relative path is resolved from the working directory, then its directory kept.
    assert load_config("../etc/chatbus.toml", {}).base_dir == (tmp_path / "etc").resolve()


def test_chatbus_config_variable_picks_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "config.toml", "[server]\nport = 1111\n")
    other = write(tmp_path / "other.toml", "[server]\nport = 2222\n")
    config = load_config(None, {"CHATBUS_CONFIG": str(other)})
    assert config.server.port == 2222
    # An explicit path wins over the variable.
    explicit = write(tmp_path / "explicit.toml", "[server]\nport = 3333\n")
    assert load_config(explicit, {"CHATBUS_CONFIG": str(other)}).server.port == 3333


async def test_the_container_config_serves_on_mongodb(
    monkeypatch: pytest.MonkeyPatch, mongodb_server_uri: str
) -> None:
    """deploy/config.toml, which the Dockerfile copies (no container runs here): with the
    environment compose.yaml gives it, chatbus opens its MongoDB and answers with a key."""
    monkeypatch.setenv("CHATBUS_MONGODB_URI", mongodb_server_uri)
    monkeypatch.setenv("CHATBUS_API_KEY", "cb-container-0123456789")
    config = load_config(REPO / "deploy" / "config.toml", {})
    assert (config.server.host, config.history.backend) == ("0.0.0.0", "mongo")
    check_exposure(config.server.host, config.auth)  # keys: it may listen beyond loopback
    request = ChatInput(query="in a box")
    async with open_service(config) as service, service.start(request, Caller("r")) as turn:
        result = await turn.run()
    assert result.text == "in a box"


def test_the_repository_config_loads() -> None:
    config = load_config(REPO / "config.toml", {})
    assert config.default_model == "echo"
    assert config.models["echo"].provider == "echo"
    assert config.base_dir == REPO.resolve()
    assert config.server.port == 7861
    assert config.history.backend == "sqlite"
    assert config.history.options() == {"path": "chatbus.db"}
    # chatchat's llm_chat names, which its webui offers
    assert set(config.prompts) == {"default", "with_history", "py"}
    assert config.prompts["default"] == "{{ input }}"
    assert config.prompts["with_history"].endswith("{{ input }}")
    assert config.plugins.settings("chatchat") == {"frames": "sse"}


def test_plugin_tables_are_handed_over_as_written(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", "[plugins.mine]\nanything = [1, 2]\n")
    config = load_config(file, {"CHATBUS_PLUGINS__MINE__OTHER": "x"})
    assert config.plugins.settings("mine") == {"anything": [1, 2], "other": "x"}
    assert config.plugins.settings("absent") == {}
    with pytest.raises(ConfigError, match=r"\[plugins\.mine\] must be a table"):
        load_config(write(tmp_path / "bad.toml", "[plugins]\nmine = 3\n"), {})


# Environment overrides


def test_env_overrides_port_as_int(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", "[server]\nport = 9001\nhost = '10.0.0.1'\n")
    config = load_config(file, {"CHATBUS_SERVER__PORT": "8000"})
    assert config.server.port == 8000
    assert isinstance(config.server.port, int)
    assert config.server.host == "10.0.0.1"  # the rest of the section is kept


def test_env_overrides_a_top_level_key(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.toml",
        '[models.echo]\nprovider = "echo"\n[models.x]\nprovider = "echo"\n',
    )
    config = load_config(file, {"CHATBUS_DEFAULT_MODEL": "x"})
    assert config.default_model == "x"


def test_env_overrides_a_float(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"CHATBUS_CHAT__KEEPALIVE_SECONDS": "0.5"})
    assert config.chat.keepalive_seconds == 0.5
    assert config.chat.max_query_chars == 32_000


def test_env_plain_string_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None,
        {
            "CHATBUS_SERVER__HOST": "0.0.0.0",  # not a TOML scalar: taken as it is
            "CHATBUS_HISTORY__SQLITE__PATH": "/var/lib/chatbus/chat.db",
        },
    )
    assert config.server.host == "0.0.0.0"
    assert config.history.options() == {"path": "/var/lib/chatbus/chat.db"}


def test_env_adds_one_key_to_a_default_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overriding one key of [prompts] or [models] keeps the other (default) entries."""
    monkeypatch.chdir(tmp_path)
    config = load_config(
        None,
        {
            "CHATBUS_PROMPTS__SHORT": "Briefly: {{ input }}",
            "CHATBUS_MODELS__ECHO__DELAY": "0.05",
        },
    )
    assert config.prompts == {"default": "{{ input }}", "short": "Briefly: {{ input }}"}
    assert config.models["echo"].provider == "echo"
    # Provider options stay strings here; the provider's own validation types them.
    assert config.models["echo"].options() == {"delay": "0.05"}
    assert EchoOptions.model_validate(config.models["echo"].options()).delay == 0.05


def test_other_variables_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"PORT": "1", "CHATBUS": "x", "OTHER_SERVER__PORT": "2"})
    assert config.server.port == 7861


def test_env_override_with_a_bad_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = error_of(None, {"CHATBUS_SERVER__PORT": "abc"})
    assert "server.port" in message
    assert "valid integer" in message


# Errors: one line naming the file and the key


def test_unknown_key(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", "[server]\nprot = 1\n")
    message = error_of(file)
    assert message == f"{file}: server.prot: unknown key"


def test_unknown_section(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", "[sever]\nport = 1\n")
    assert error_of(file) == f"{file}: sever: unknown key"


def test_unknown_key_in_history(tmp_path: Path) -> None:
    """[history] holds tables of store options; a misspelt scalar key is not one of them."""
    file = write(tmp_path / "c.toml", '[history]\nbackend = "sqlite"\nbackned = "mongo"\n')
    assert error_of(file) == f"{file}: history.backned: unknown key"


def test_bad_type(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", '[server]\nport = "abc"\n')
    message = error_of(file)
    assert message.startswith(f"{file}: server.port: ")
    assert "valid integer" in message


def test_out_of_range(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", "[server]\nport = 70000\n")
    message = error_of(file)
    assert message.startswith(f"{file}: server.port: ")
    assert "65535" in message


def test_answer_limits_default_and_ceiling(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.toml",
        '[models.echo]\nprovider = "echo"\n'
        '[models.big]\nprovider = "echo"\nmax_answer_chars = 2097152\n'
        "answer_timeout_seconds = 30\n",
    )
    config = load_config(file, {})
    assert (config.chat.max_answer_chars, config.chat.answer_timeout_seconds) == (1048576, 600.0)
    assert config.models["echo"].max_answer_chars is None  # [chat]'s applies
    assert config.models["big"].max_answer_chars == 2097152
    assert config.models["big"].answer_timeout_seconds == 30.0
    assert config.models["big"].options() == {}  # chatbus's keys, not the provider's


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[chat]\nmax_answer_chars = 2097153\n", "chat.max_answer_chars"),
        ("[chat]\nanswer_timeout_seconds = 0\n", "chat.answer_timeout_seconds"),
        (
            '[models.echo]\nprovider = "echo"\nmax_answer_chars = 3000000\n',
            "models.echo.max_answer_chars",
        ),
        (
            '[models.echo]\nprovider = "echo"\nanswer_timeout_seconds = -1\n',
            "models.echo.answer_timeout_seconds",
        ),
    ],
)
def test_answer_limits_out_of_range(tmp_path: Path, text: str, key: str) -> None:
    """No record can outgrow a MongoDB document (16 MB): 2 Mi characters at most."""
    file = write(tmp_path / "c.toml", text)
    assert error_of(file).startswith(f"{file}: {key}: ")


def test_model_without_provider(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", '[models.echo]\nprovider = "echo"\n[models.m]\nx = 1\n')
    assert error_of(file) == f"{file}: models.m.provider: Field required"


def test_default_model_not_in_models(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", 'default_model = "gpt"\n[models.echo]\nprovider = "echo"\n')
    # (the file's path names the test, so the key is checked after it)
    message = error_of(file)
    assert message == f"{file}: default_model: 'gpt' is not in [models] (configured: echo)"


def test_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "missing.toml"
    assert error_of(file) == f"{file}: no such configuration file"


def test_missing_file_named_by_variable(tmp_path: Path) -> None:
    file = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(None, {"CHATBUS_CONFIG": str(file)})
    assert str(info.value) == f"{file}: no such configuration file"


def test_invalid_toml(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", "[server\nport = 1\n")
    message = error_of(file)
    assert message.startswith(f"{file}: not valid TOML: ")
    assert "line 1" in message


# The CLI: one line on stderr, exit code 2, no traceback


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHATBUS_")}
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def assert_one_config_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatbus: configuration error:")
    assert result.stdout == ""
    return lines[0]


def test_cli_bad_file(tmp_path: Path) -> None:
    file = write(tmp_path / "bad.toml", "[server]\nprot = 1\n")
    line = assert_one_config_error(run_cli("--config", str(file), "serve"))
    assert line == f"chatbus: configuration error: {file}: server.prot: unknown key"


def test_cli_missing_file(tmp_path: Path) -> None:
    file = tmp_path / "nope.toml"
    line = assert_one_config_error(run_cli("--config", str(file), "serve"))
    assert line == f"chatbus: configuration error: {file}: no such configuration file"


def test_cli_unknown_provider_kind(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", 'default_model = "x"\n[models.x]\nprovider = "nope"\n')
    line = assert_one_config_error(run_cli("--config", str(file), "serve", "--port", "0"))
    assert line.startswith(f"chatbus: configuration error: {file}: models.x.provider: ")
    assert "unknown provider kind 'nope'" in line
    assert "echo" in line  # the known kinds are listed
    assert not (tmp_path / "chatbus.db").exists()


def test_cli_openai_compat_without_base_url(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.toml",
        'default_model = "vllm"\n[models.vllm]\nprovider = "openai_compat"\nmodel = "m"\n',
    )
    line = assert_one_config_error(run_cli("--config", str(file), "serve", "--port", "0"))
    assert line == f"chatbus: configuration error: {file}: models.vllm.base_url: Field required"


def test_other_chatbus_variables_are_not_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {"CHATBUS_TEST_MONGODB_URI": "mongodb://x", "CHATBUS_CONFIG_DIR": "/x"}
    config = load_config(None, environ)
    assert config.default_model == "echo"


def test_override_values_take_the_type_of_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {
        "CHATBUS_DEFAULT_MODEL": "2024",
        "CHATBUS_MODELS__2024__PROVIDER": "echo",
        "CHATBUS_PLUGINS__MODULES": '["a.b"]',
        "CHATBUS_CHAT__KEEPALIVE_SECONDS": "0.5",
    }
    config = load_config(None, environ)
    assert config.default_model == "2024"
    assert config.plugins.modules == ["a.b"]
    assert config.chat.keepalive_seconds == 0.5


# Variables that look like overrides but are not (#16.6)


def test_variables_that_look_like_overrides_are_found_with_what_they_meant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {
        "CHATBUS_SERVER_PORT": "8000",  # one underscore
        "CHATBUS_PORT": "8000",  # no section
        "CHATBUS_SEVER__PORT": "8000",  # a misspelt section
        "CHATBUS_MAX_HISTORY_TURNS": "5",
        "CHATBUS_SERVER__HOST": "127.0.0.1",  # an override
        "CHATBUS_DEFAULT_MODEL": "echo",  # an override of a top-level key
    }
    assert misnamed_overrides(environ, load_config(None, environ)) == {
        "CHATBUS_SERVER_PORT": "CHATBUS_SERVER__PORT",
        "CHATBUS_PORT": "CHATBUS_SERVER__PORT",
        "CHATBUS_SEVER__PORT": "CHATBUS_SERVER__PORT",
        "CHATBUS_MAX_HISTORY_TURNS": "CHATBUS_CHAT__MAX_HISTORY_TURNS",
    }


def test_variables_the_configuration_names_and_others_are_not_misnamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    file = write(
        tmp_path / "c.toml",
        '[auth.keys.ci]\ntenant = "t"\nkey_env = "CHATBUS_SERVER_KEY"\n'
        '[models.echo]\nprovider = "echo"\n',
    )
    environ = {
        "CHATBUS_SERVER_KEY": "secret",  # named by key_env: not a mistake, however it looks
        "CHATBUS_CALLBACK_SECRET": "whsec_x",  # [chat] callback_secret_env's default
        "CHATBUS_MONGODB_URI": "mongodb://x",
        "CHATBUS_CONFIG": str(file),
        "CHATBUS_TEST_MONGODB_URI": "mongodb://x",
        "CHATBUS_MY_OWN_THING": "x",
        "CHATBUS_SERVER__": "x",
    }
    assert misnamed_overrides(environ, load_config(None, environ)) == {}


def test_the_cli_warns_of_a_misnamed_variable(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", '[history.sqlite]\npath = "c.db"\n')
    env = {**os.environ, "CHATBUS_SERVER_PORT": "8000"}
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", "--config", str(file), "chat", "hi"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warning = result.stderr.splitlines()[0]
    assert '"event": "not a configuration override"' in warning
    assert '"variable": "CHATBUS_SERVER_PORT"' in warning
    assert '"did_you_mean": "CHATBUS_SERVER__PORT"' in warning


# Host and host:port lists


@pytest.mark.parametrize(
    ("key", "entry", "problem"),
    [
        ("server.allowed_hosts", "hooks.example:http", "is not a host or host:port"),
        ("server.allowed_hosts", "[::1]:70000", "the port must be 1 to 65535"),
        ("server.allowed_hosts", "hooks.example:0", "the port must be 1 to 65535"),
        ("server.allowed_hosts", ":8080", "names no host"),
        ("server.allowed_hosts", "a:b:c", "is not a host or host:port"),
        ("server.allowed_hosts", "", "names no host"),
    ],
)
def test_a_bad_host_entry_is_a_config_error(
    tmp_path: Path, key: str, entry: str, problem: str
) -> None:
    section, name = key.split(".")
    file = write(tmp_path / "c.toml", f'[{section}]\n{name} = ["ok.example", "{entry}"]\n')
    message = error_of(file)
    assert message.startswith(f"{file}: {key}: ")
    assert problem in message


def test_host_entries_with_ports_and_brackets_load(tmp_path: Path) -> None:
    file = write(
        tmp_path / "c.toml",
        '[server]\nallowed_hosts = ["chat.internal", "[fd00::1]", "10.0.0.5:8080", "*"]\n',
    )
    config = load_config(file, {})
    assert config.server.allowed_hosts == ["chat.internal", "[fd00::1]", "10.0.0.5:8080", "*"]
