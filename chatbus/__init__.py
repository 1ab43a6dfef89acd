"""chatbus's public plugin API: everything a plugin needs, from one module.

    from chatbus import hookimpl, ModelCall, ModelSpec, Usage, UpstreamUnavailable

Plugins, the built-in ones included, import from here, never from `core`'s modules: what
is named in `__all__` is the surface chatbus keeps stable; the rest of `core` may move.
docs/plugins.md documents each hook and these types.
"""

from __future__ import annotations

from core.chat_input import ChatInput
from core.config import Config, ConfigError, ModelConfig, plugin_settings
from core.errors import (
    CallbackNotAllowed,
    ChatError,
    MessageNotFound,
    UnknownModel,
    UnknownPrompt,
)
from core.events import (
    LIFECYCLE_EVENTS,
    ChatCancelled,
    ChatCompleted,
    ChatEnded,
    ChatEvent,
    ChatFailed,
    ChatReceived,
    ChatStarted,
    Event,
    FeedbackReceived,
)
from core.history import (
    READABLE,
    Conversation,
    HistoryStore,
    HistoryStoreFactory,
    ListingKey,
    MessageRecord,
    Outcome,
    Status,
    StoreUnavailable,
    Turn,
)
from core.hookspecs import PROJECT, Lifespan, hookimpl
from core.keys import CONFIG, METRICS, PLUGINS, SERVICE
from core.openapi import Content, ResponseModel, operation
from core.outbox import Delivery, DeliveryStatus, Outbox
from core.providers import (
    CONTEXT_HINTS,
    AnswerTimeout,
    AnswerTooLong,
    AuthenticationFailed,
    BadRequest,
    Chunk,
    ContextWindowExceeded,
    Finish,
    GenerationParams,
    MalformedResponse,
    Message,
    ModelCall,
    ModelSpec,
    Provider,
    ProviderError,
    ProviderFactory,
    RateLimited,
    Reasoning,
    ToolCallDelta,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
    key_from_env,
    message_text,
    redacted,
    refuse_keys_in_file,
    warn_if_key_unset,
)
from core.retry_after import retry_after_seconds
from core.routes import caller_of
from core.turn import ChatTurn, ClientDisconnected, TurnIdentity, TurnResult
from core.validation import first_problem
from core.web import REQUEST_ID, TENANT, ApiError, answer_errors_as, json_response, read_body

__all__ = [
    "CONFIG",
    "CONTEXT_HINTS",
    "LIFECYCLE_EVENTS",
    "METRICS",
    "PLUGINS",
    "PROJECT",
    "READABLE",
    "REQUEST_ID",
    "SERVICE",
    "TENANT",
    "AnswerTimeout",
    "AnswerTooLong",
    "ApiError",
    "AuthenticationFailed",
    "BadRequest",
    "CallbackNotAllowed",
    "ChatCancelled",
    "ChatCompleted",
    "ChatEnded",
    "ChatError",
    "ChatEvent",
    "ChatFailed",
    "ChatInput",
    "ChatReceived",
    "ChatStarted",
    "ChatTurn",
    "Chunk",
    "ClientDisconnected",
    "Config",
    "ConfigError",
    "Content",
    "ContextWindowExceeded",
    "Conversation",
    "Delivery",
    "DeliveryStatus",
    "Event",
    "FeedbackReceived",
    "Finish",
    "GenerationParams",
    "HistoryStore",
    "HistoryStoreFactory",
    "Lifespan",
    "ListingKey",
    "MalformedResponse",
    "Message",
    "MessageNotFound",
    "MessageRecord",
    "ModelCall",
    "ModelConfig",
    "ModelSpec",
    "Outbox",
    "Outcome",
    "Provider",
    "ProviderError",
    "ProviderFactory",
    "RateLimited",
    "Reasoning",
    "ResponseModel",
    "Status",
    "StoreUnavailable",
    "ToolCallDelta",
    "Turn",
    "TurnIdentity",
    "TurnResult",
    "UnknownModel",
    "UnknownPrompt",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "Usage",
    "answer_errors_as",
    "caller_of",
    "first_problem",
    "hookimpl",
    "json_response",
    "key_from_env",
    "message_text",
    "operation",
    "plugin_settings",
    "read_body",
    "redacted",
    "refuse_keys_in_file",
    "retry_after_seconds",
    "warn_if_key_unset",
]
