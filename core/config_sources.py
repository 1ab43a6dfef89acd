"""Where the configuration comes from: a TOML file, then `CHATBUS_A__B` environment
variables overriding it key by key."""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from core.config import INTERNAL_KEYS, Config, ConfigError
from core.validation import first_problem

ENV_PREFIX = "CHATBUS_"
ENV_CONFIG_PATH = "CHATBUS_CONFIG"


def load_config(path: str | Path | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Read the configuration, apply environment overrides and validate it."""
    chosen = path or environ.get(ENV_CONFIG_PATH)
    file = Path(chosen) if chosen else Path("config.toml")
    data: dict[str, Any] = {}
    where = str(file)
    if chosen or file.exists():
        data = _read_toml(file)
        data["base_dir"] = file.resolve().parent
        data["source"] = where
    else:
        where = data["source"] = f"built-in defaults (no {file} in {Path.cwd()})"
    for keys, value in env_overrides(environ):
        # One key of a table left to its default (`[models]`, `[prompts]`) joins the default.
        default = getattr(Config.model_fields.get(keys[0]), "default", None)
        if len(keys) > 1 and keys[0] not in data and isinstance(default, dict):
            data[keys[0]] = {
                name: item.model_dump() if isinstance(item, BaseModel) else item
                for name, item in default.items()
            }
        _set_path(data, keys, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {first_problem(exc)}") from None


def env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    """`CHATBUS_A__B=v` becomes (["a", "b"], v) when `a` is a configuration key, so other
    CHATBUS_ variables (CHATBUS_CONFIG, CHATBUS_TEST_*) are left alone."""
    found = []
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = [part.lower() for part in name.removeprefix(ENV_PREFIX).split("__")]
        if all(keys) and keys[0] in Config.model_fields and keys[0] not in INTERNAL_KEYS:
            found.append((keys, _parse_value(raw)))
    return found


def misnamed_overrides(environ: Mapping[str, str], config: Config) -> dict[str, str]:
    """CHATBUS_ variables that look like overrides but override nothing (CHATBUS_SERVER_PORT,
    CHATBUS_PORT, CHATBUS_SEVER__PORT), each with what it may have meant. Variables the
    configuration names (secrets: `*_env` keys) and CHATBUS_CONFIG / CHATBUS_TEST_* are not."""
    overrides = {ENV_PREFIX + "__".join(keys).upper() for keys, _ in env_overrides(environ)}
    named = set(_variables_named(config.model_dump()))
    found = {}
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name in overrides or name in named:
            continue
        rest = name.removeprefix(ENV_PREFIX).lower()
        if name == ENV_CONFIG_PATH or rest.startswith("test_"):
            continue
        meant = _meant_override(rest)
        if meant:
            found[name] = meant
    return found


def _meant_override(rest: str) -> str | None:
    """The override a variable's name (after CHATBUS_, lower-cased) may have meant."""
    sections = {
        name: field.annotation
        for name, field in Config.model_fields.items()
        if name not in INTERNAL_KEYS
    }
    if "__" in rest:
        section = rest.split("__")[0]
        if section in sections:
            return None  # a real section: a bad key there is a validation error already
        close = difflib.get_close_matches(section, sections, n=1)
        return (ENV_PREFIX + rest.replace(section, close[0], 1)).upper() if close else None
    meant = []
    for section, kind in sections.items():
        keys = kind.model_fields if isinstance(kind, type) and issubclass(kind, BaseModel) else {}
        for key in keys:
            if rest in (key, f"{section}_{key}"):
                meant.append(f"{ENV_PREFIX}{section}__{key}".upper())
    return " or ".join(meant) or None


def _variables_named(data: Any) -> list[str]:
    """The values of every `*_env` key: the environment variables the configuration reads."""
    if isinstance(data, dict):
        named = []
        for key, value in data.items():
            if isinstance(key, str) and key.endswith("_env") and isinstance(value, str):
                named.append(value)
            else:
                named.extend(_variables_named(value))
        return named
    if isinstance(data, list):
        return [name for item in data for name in _variables_named(item)]
    return []


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None


def _parse_value(raw: str) -> Any:
    """Arrays and tables are read as TOML; anything else stays a string, which validation
    turns into the key's type ("8000" for a port, "true" for a flag)."""
    if raw.startswith(("[", "{")):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return raw


def _set_path(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"environment override {'.'.join(keys)}: {key} is not a table")
    data[keys[-1]] = value
