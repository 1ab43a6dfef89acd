"""The lifecycle events of a chat, one frozen dataclass each, one hook each."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.providers import Usage


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    hook: ClassVar[str]  # the name of the hook this event is delivered to
    message_id: str
    conversation_id: str
    tenant: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatEvent(Event):
    request_id: str
    model: str
    query: str
    callback_url: str | None = None  # async mode: where the end of the chat is delivered


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatReceived(ChatEvent):
    """A valid request naming a known model and prompt arrived; nothing is stored yet."""

    hook = "chat_received"
    stream: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatStarted(ChatEvent):
    """The turn is stored and the model is being called."""

    hook = "chat_started"
    history_turns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatEnded(ChatEvent):
    text: str  # the whole answer, or the part produced before the end
    usage: Usage | None
    latency: float  # seconds from the model call to the end
    first_token_latency: float | None
    finish_reason: str | None = None  # a completed turn's: `stop`, `length`, `tool_calls`, ...
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI's shape: {"id", "type", "function"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCompleted(ChatEnded):
    hook = "chat_completed"


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatFailed(ChatEnded):
    hook = "chat_failed"
    error_type: str
    error_message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatCancelled(ChatEnded):
    """The client went away; the upstream call was cancelled and the partial text kept."""

    hook = "chat_cancelled"


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackReceived(Event):
    hook = "feedback_received"
    score: int
    reason: str


LIFECYCLE_EVENTS: tuple[type[Event], ...] = (
    ChatReceived,
    ChatStarted,
    ChatCompleted,
    ChatFailed,
    ChatCancelled,
    FeedbackReceived,
)
