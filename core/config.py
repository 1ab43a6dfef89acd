"""Configuration: what each section holds, with its defaults and checks. Where it is read
from is core/config_sources.py.

Precedence: `--config PATH`, else `$CHATBUS_CONFIG`, else `./config.toml` when it exists,
else the built-in defaults below (offline echo model, SQLite file in the working directory).
`CHATBUS_<SECTION>__<KEY>=value` overrides one key (`CHATBUS_SERVER__PORT=8000`); values
are read as TOML scalars when they parse as one (`8000`, `true`), else as plain strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import structlog
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from core.hosts import ORIGIN, check_authorities
from core.validation import first_problem

log = structlog.get_logger("chatbus.config")
DEFAULT_PROMPTS = {"default": "{{ input }}"}
INTERNAL_KEYS = ("base_dir", "source")  # set by load_config, not by users


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError("must start with http:// or https://")
    return url


HttpUrlText = Annotated[str, AfterValidator(_http_url)]  # a URL chatbus calls: http(s) only


# Keys of earlier versions that now belong to the webhook plugin's `[plugins.webhooks]`.
MOVED = {
    "webhooks": "[[plugins.webhooks.endpoints]]",
    "webhook_delivery": "[plugins.webhooks.delivery]",
    "callback_hosts": "[plugins.webhooks] callback_hosts",
    "callback_secret_env": "[plugins.webhooks] callback_secret_env",
}


def _refuse_moved(data: Any, where: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if isinstance(data, dict) and key in data:
            raise ValueError(f"{where}{key}: moved to {MOVED[key]}")


class ConfigError(Exception):
    """A configuration problem, said in one line: where, which key, what is wrong."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# An answer's size is bounded in characters, not bytes: `len(str)` is free on the hot path
# (one int add and compare a delta), and a character is at most 4 bytes of UTF-8 and at most
# 6 of JSON (a control character as \u0001). The default, 1 Mi characters (about 250k tokens
# of English, far above any model's output limit), stores at most 4 MiB; the ceiling, 2 Mi
# characters, at most 8 MiB in a record and 12 MiB in a webhook payload, so that either one,
# with a query (32,000 characters: 128 KB of UTF-8) and its metadata, fits MongoDB's 16 MB
# document limit.
DEFAULT_ANSWER_CHARS = 1024 * 1024
MAX_ANSWER_CHARS = 2 * 1024 * 1024
# An answer taking longer than this is cut off (`upstream_timeout`): the whole answer, with
# its retries and fallbacks, not one attempt.
DEFAULT_ANSWER_SECONDS = 600.0


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(7861, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    # Processes serving the port together (SO_REUSEPORT, Linux), each with its own event
    # loop; 1: one process, no supervisor.
    workers: int = Field(1, ge=1)
    access_log: bool = True  # one log line per request (method, path, status, ms)
    # Slow and idle clients (none of these limits a response being streamed). A client sends
    # its request line and headers in one write: 10 s is generous even on a bad mobile link,
    # and it bounds how long a slowloris holds a socket. 30 s reads the largest body at
    # about 280 kB/s. 75 s of keep-alive outlasts the 60 s idle timeout of common proxies
    # (nginx upstream, AWS ALB), so a proxy never reuses a connection chatbus is closing.
    header_timeout_seconds: float = Field(10.0, gt=0)
    body_timeout_seconds: float = Field(30.0, gt=0)
    keepalive_timeout_seconds: float = Field(75.0, gt=0)
    # Open client connections at most; past it the oldest idle one is closed (or, when every
    # one is busy, the new one is answered 503). 0: derived from the file-descriptor limit.
    max_connections: int = Field(0, ge=0)
    # Without [auth] keys only loopback Host headers are served (against DNS rebinding):
    # the other names this chatbus answers to, on any port, e.g. ["chat.internal"]; "*": any.
    allowed_hosts: list[str] = []
    # Browser pages on these origins may call chatbus (CORS), e.g. ["https://app.example"];
    # "*": any origin, without credentials. None by default.
    cors_origins: list[str] = []

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return check_authorities(hosts)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not ORIGIN.fullmatch(origin.rstrip("/")):
                raise ValueError(f"'{origin}' is not an origin (scheme://host[:port]) or *")
        return origins


class ChatConfig(Section):
    max_query_chars: int = Field(32_000, gt=0)
    max_history_turns: int = Field(100, ge=0)
    keepalive_seconds: float = Field(15.0, gt=0)
    # Past turns of a request's `conversation_id` read when it names no `history_len`, on
    # chatbus's own routes (/v1/chat/completions) and `chatbus chat`; /chat/chat keeps
    # chatchat's default, -1: none.
    default_history_len: int = Field(10, ge=0)
    # Every model's limits, unless the model sets its own (same keys on [models.<name>]).
    max_answer_chars: int = Field(DEFAULT_ANSWER_CHARS, gt=0, le=MAX_ANSWER_CHARS)
    answer_timeout_seconds: float = Field(DEFAULT_ANSWER_SECONDS, gt=0)
    # A streaming turn's answer so far is stored this often (0: never), so that a crash
    # keeps what the client saw; a turn shorter than this costs nothing.
    checkpoint_seconds: float = Field(5.0, ge=0)


class HistoryConfig(BaseModel):
    """`backend` names the store; `[history.<backend>]` tables hold each store's options."""

    model_config = ConfigDict(extra="allow")
    backend: str = "sqlite"
    # Every instance on a store holds a lease in it, renewed every `heartbeat_seconds`; as
    # often, it ends `interrupted` the running turns of instances whose lease expired (they
    # died: kill -9, a lost machine), so those end within lease + heartbeat seconds, with
    # their events. A lease outlasts two heartbeats: one late beat is not a death.
    lease_seconds: float = Field(15.0, gt=0, allow_inf_nan=False)
    heartbeat_seconds: float = Field(3.0, gt=0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sweep_after_seconds" in data:
            log.warning(
                "history.sweep_after_seconds is no longer used: remove it (instances hold"
                " leases now, and a dead one's turns are ended once its lease expires:"
                " history.lease_seconds)"
            )
            data = {key: value for key, value in data.items() if key != "sweep_after_seconds"}
        return data

    @model_validator(mode="after")
    def _lease_outlasts_heartbeats(self) -> HistoryConfig:
        if self.lease_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"lease_seconds: {self.lease_seconds:g} is less than twice heartbeat_seconds"
                f" ({self.heartbeat_seconds:g}): one late heartbeat would let other instances"
                " end this one's turns"
            )
        return self

    def options(self) -> dict[str, Any]:
        options = (self.model_extra or {}).get(self.backend, {})
        if not isinstance(options, dict):
            raise ConfigError(f"history.{self.backend}: expected a table of options")
        return options


class ModelConfig(BaseModel):
    """One configured model: `provider` names the kind, the keys below are chatbus's, and
    every other key belongs to that provider."""

    model_config = ConfigDict(extra="allow")
    provider: str
    # Before the first delta only: a retryable failure (connect error, timeout, 429, 5xx) is
    # retried `retries` times with exponential backoff from `retry_backoff` seconds; then,
    # on any failure, the `fallbacks` are tried in order, each with its own retries.
    retries: int = Field(2, ge=0, le=10)
    retry_backoff: float = Field(0.5, ge=0, le=60)
    fallbacks: list[str] = []
    # None: [chat]'s. The size limit is the answering model's; the duration limit is the
    # requested model's, for the whole answer (its retries and fallbacks included).
    max_answer_chars: int | None = Field(None, gt=0, le=MAX_ANSWER_CHARS)
    answer_timeout_seconds: float | None = Field(None, gt=0)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ApiKey(Section):
    """One API key: its tenant, and either its SHA-256 (hex) or the variable holding it."""

    tenant: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        if (self.sha256 is None) == (self.key_env is None):
            raise ValueError("give the key's sha256 or its key_env, one of them")
        return self


class AuthConfig(Section):
    keys: dict[str, ApiKey] = {}
    allow_public_without_keys: bool = False  # listen beyond loopback with no keys at all


class EventsConfig(Section):
    timeout_seconds: float = Field(10.0, gt=0)


class PluginsConfig(BaseModel):
    """`modules`: extra plugin modules to load. Every `[plugins.<name>]` table is that
    plugin's own settings: core keeps them as they are written, and the plugin validates
    them (`plugin_settings`)."""

    model_config = ConfigDict(extra="allow")
    modules: list[str] = []

    @model_validator(mode="after")
    def _tables_only(self) -> PluginsConfig:
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"[plugins.{name}] must be a table of that plugin's settings")
        return self

    def settings(self, name: str) -> dict[str, Any]:
        """The `[plugins.<name>]` table, empty when the file has none."""
        return dict((self.model_extra or {}).get(name, {}))


S = TypeVar("S", bound=BaseModel)


def plugin_settings(config: Config, name: str, schema: type[S]) -> S:
    """A plugin's `[plugins.<name>]` table validated by its own `schema`; a problem is a
    ConfigError naming the key."""
    try:
        return schema.model_validate(config.plugins.settings(name))
    except ValidationError as exc:
        raise ConfigError(first_problem(exc, f"plugins.{name}")) from None


class Config(Section):
    default_model: str = "echo"
    server: ServerConfig = ServerConfig()
    chat: ChatConfig = ChatConfig()
    history: HistoryConfig = HistoryConfig()
    models: dict[str, ModelConfig] = {"echo": ModelConfig(provider="echo")}
    prompts: dict[str, str] = DEFAULT_PROMPTS
    auth: AuthConfig = AuthConfig()
    events: EventsConfig = EventsConfig()
    plugins: PluginsConfig = PluginsConfig()
    # Where relative paths in the configuration are resolved from, and what was read.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    source: str = Field("built-in defaults", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            _refuse_moved(data, "", ("webhooks", "webhook_delivery"))
            _refuse_moved(data.get("chat"), "chat.", ("callback_hosts", "callback_secret_env"))
        return data

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        if self.default_model not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ValueError(
                f"default_model: '{self.default_model}' is not in [models] (configured: {known})"
            )
        for key, value in (self.history.model_extra or {}).items():
            if not isinstance(value, dict):  # only `[history.<backend>]` tables may be added
                raise ValueError(f"history.{key}: unknown key")
        if "default" not in self.prompts:
            raise ValueError("[prompts] must define 'default'")
        return self
