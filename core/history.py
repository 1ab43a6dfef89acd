"""The conversation record and the contract every history store fulfils."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from core.outbox import Delivery, Outbox
from core.providers import Usage


class Status(StrEnum):
    STREAMING = "streaming"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # its instance died (its lease expired); ended by a live one


# Turns a model reads back as history: answered, or cut short by the client (what it saw).
READABLE = (Status.COMPLETED, Status.CANCELLED)


class StoreUnavailable(Exception):
    """The store cannot be reached now; the service answers 503 and recovers by itself."""


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
    instance_id: str = ""  # the chatbus instance answering it: its lease says if it lives


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a turn ended, as written back to its record."""

    response: str
    status: Status
    usage: Usage | None
    latency: float
    error: str | None = None
    model: str | None = None  # the model that answered (None: the one asked for)
    finish_reason: str | None = None  # a completed turn's, as the model said
    reasoning: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI's shape: {"id", "type", "function"}

    def answer_meta(self) -> dict[str, Any]:
        """What a store merges into the record's `meta`: the parts of the answer beside its
        text (the finish reason, the reasoning, the tool calls), those there are."""
        found = {
            "finish_reason": self.finish_reason,
            "reasoning": self.reasoning,
            "tool_calls": list(self.tool_calls),
        }
        return {key: value for key, value in found.items() if value}


@dataclass(frozen=True, slots=True)
class Turn:
    """A past turn as history: what asked (the query, or the tool results it answered) and
    what answered (the text, and the tool calls the model made)."""

    query: str
    response: str
    tool_results: tuple[dict[str, Any], ...] = ()
    tool_calls: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, query: str, response: str, meta: dict[str, Any]) -> Turn:
        """From a stored record's fields (its `meta` holds the tool results and calls)."""
        results, calls = meta.get("tool_results") or (), meta.get("tool_calls") or ()
        return cls(query, response, tuple(results), tuple(calls))

    def messages(self) -> list[dict[str, Any]]:
        """The turn replayed as OpenAI-shaped messages."""
        asked = list(self.tool_results) or [{"role": "user", "content": self.query}]
        answer: dict[str, Any] = {"role": "assistant", "content": self.response}
        if self.tool_calls:
            answer = {
                **answer,
                "content": self.response or None,
                "tool_calls": list(self.tool_calls),
            }
        return [*asked, answer]


@dataclass(frozen=True, slots=True)
class ListingKey:
    """A place in a tenant's conversations, the most recently active first: where keyset
    paging resumes (the page after it starts with the next less recently active)."""

    last_seq: int  # the store's order of its conversation's latest turn
    conversation_id: str  # breaks ties (on MongoDB two instances may stamp the same seq)


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    turns: int
    first_query: str
    created_at: float
    updated_at: float
    last_seq: int = 0  # the store's order of its latest turn: listings are by it, newest first

    @property
    def key(self) -> ListingKey:
        return ListingKey(self.last_seq, self.conversation_id)


class HistoryStore(Protocol):
    """Every method is scoped to a tenant where it names one: another tenant's records do
    not exist for it. Unreachable storage raises `StoreUnavailable`.

    `outbox` keeps the deliveries events owe the outside world beside the turns
    (core/outbox.py): `finish_message` writes a turn's end and its deliveries in one step."""

    @property
    def outbox(self) -> Outbox: ...  # read-only: a store may hold a subtype of Outbox

    async def open(self) -> None:
        """Connect and prepare (schema, indexes). An unreachable server must not raise:
        the store is then not ready, and `ping` says so until it is."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return when the store answers; raise `StoreUnavailable` when it does not."""

    async def add_message(self, record: MessageRecord) -> None: ...

    async def finish_message(
        self, message_id: str, outcome: Outcome, deliveries: Sequence[Delivery] = ()
    ) -> None:
        """Write how a turn ended, and the deliveries its end event owes, in one step: a
        crash leaves both written or neither. Only over a turn still `streaming`: a turn
        ends once, and a later end (its instance was slow, not dead, when another found its
        lease expired and ended it `interrupted`) is dropped with its deliveries."""

    async def recent_turns(self, tenant: str, conversation_id: str, limit: int) -> list[Turn]:
        """The last `limit` turns with a non-empty, READABLE response, oldest first."""
        ...

    async def get_message(self, tenant: str, message_id: str) -> MessageRecord | None: ...

    async def set_feedback(
        self, tenant: str, message_id: str, score: int, reason: str
    ) -> MessageRecord | None:
        """Record feedback; the updated record, or None when the tenant has no such message."""
        ...

    async def conversations(
        self, tenant: str, limit: int, offset: int, after: ListingKey | None = None
    ) -> list[Conversation]:
        """The tenant's conversations, the most recently active first, from just `after`
        that key (keyset paging) when given, skipping `offset` of them. Its cost grows with
        the page, not with the history."""
        ...

    async def messages(
        self, tenant: str, conversation_id: str, limit: int, offset: int
    ) -> list[MessageRecord]:
        """A conversation's turns, oldest first."""
        ...

    async def delete_conversation(self, tenant: str, conversation_id: str) -> int:
        """Delete a conversation's turns; how many there were."""
        ...

    async def save_partial(self, message_id: str, response: str) -> None:
        """The answer so far of a turn still `streaming` (a checkpoint: a crash keeps it); a
        turn that has ended is left as it is."""

    async def keep_lease(self, instance_id: str, now: float, lease_until: float) -> None:
        """Hold `instance_id`'s lease until `lease_until` (wall clock), and forget the leases
        that expired before `now`: an instance without a lease is dead to the others."""

    async def claim_orphaned_turns(
        self, instance_id: str, now: float, limit: int
    ) -> list[MessageRecord]:
        """Up to `limit` turns still `streaming` whose instance holds no lease at `now` (it
        died, or never took one), handed over to `instance_id`, atomically: no two claimers
        get the same turn. A claimer that dies before ending them leaves them to the next
        one, once its own lease has expired."""
        ...


# A factory builds the store named by `[history] backend` from its `[history.<backend>]`
# options; relative paths in them are resolved against `base_dir`.
HistoryStoreFactory = Callable[[dict[str, Any], Path], HistoryStore]
