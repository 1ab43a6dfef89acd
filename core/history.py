"""The conversation record and the contract every history store fulfils."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from core.providers import Usage


class Status(StrEnum):
    STREAMING = "streaming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class MessageRecord:
    """One turn: the user's query and the model's response (chatchat's `message` row)."""

    message_id: str
    conversation_id: str
    query: str
    model: str
    tenant: str = "default"
    chat_type: str = "llm_chat"
    response: str = ""
    status: Status = Status.STREAMING
    usage: Usage | None = None
    latency: float | None = None  # seconds from the model call to the last delta
    error: str | None = None  # the error type of a failed turn
    feedback_score: int = -1
    feedback_reason: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0  # wall-clock seconds; stores order turns by insertion, not this


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a turn ended, as written back to its record."""

    response: str
    status: Status
    usage: Usage | None
    latency: float
    error: str | None = None
    model: str | None = None  # the model that answered, when not the one asked for


@dataclass(frozen=True, slots=True)
class Turn:
    query: str
    response: str


class HistoryStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_message(self, record: MessageRecord) -> None: ...

    async def finish_message(self, message_id: str, outcome: Outcome) -> None: ...

    async def recent_turns(self, tenant: str, conversation_id: str, limit: int) -> list[Turn]:
        """The last `limit` turns with a non-empty response, oldest first."""
        ...

    async def get_message(self, tenant: str, message_id: str) -> MessageRecord | None: ...

    async def set_feedback(
        self, tenant: str, message_id: str, score: int, reason: str
    ) -> MessageRecord | None:
        """Record feedback; the updated record, or None when the tenant has no such message."""
        ...


# A factory builds the store named by `[history] backend` from its `[history.<backend>]`
# options; relative paths in them are resolved against `base_dir`.
HistoryStoreFactory = Callable[[dict[str, Any], Path], HistoryStore]
