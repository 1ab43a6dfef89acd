"""The conversations API: list a tenant's conversations, read one's turns, delete one.

Every route is scoped to the caller's tenant: another tenant's conversation does not exist
for it (404, never 403, so that ids do not leak).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from core.chat import Caller
from core.history import Conversation, HistoryStore, ListingKey, MessageRecord, Status
from core.keys import SERVICE
from core.openapi import ResponseModel, operation
from core.web import ApiError, json_response

CONVERSATIONS_LIMIT, CONVERSATIONS_MAX = 20, 100
MESSAGES_LIMIT, MESSAGES_MAX = 50, 200
OFFSET_MAX = 1_000_000_000  # beyond any real count; keeps the value in every store's range
_INTEGER = re.compile(r"-?[0-9]{1,12}")
CURSOR_MAX_CHARS = 2048  # a cursor holds a conversation id; ids are far shorter

CallerOf = Callable[[web.Request], Caller]


class ConversationSummary(ResponseModel):
    conversation_id: str
    turns: int
    first_query: str
    created_at: float
    updated_at: float


class Page(ResponseModel):
    limit: int
    offset: int
    next_offset: int | None  # null on the last page


class ConversationsPage(Page):
    """The caller's conversations, the most recently active first. Page on with
    `next_offset`, or with `next_cursor` (keyset paging: no conversation is listed twice,
    however many turns are added meanwhile, and a deep page costs what the first does)."""

    conversations: list[ConversationSummary]
    next_cursor: str | None  # null on the last page; pass it as `cursor` for the next one


class Feedback(ResponseModel):
    score: int
    reason: str


class TokenCounts(ResponseModel):
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None = None  # of the prompt, when the upstream said
    reasoning_tokens: int | None = None  # of the completion, when the upstream said


class StoredMessage(ResponseModel):
    message_id: str
    query: str
    response: str
    status: Status
    model: str
    usage: TokenCounts | None
    latency: float | None
    error: str | None
    feedback: Feedback | None
    created_at: float
    finish_reason: str | None  # a completed turn's, as the model said
    reasoning: str  # the model's thinking, never in `response`
    tool_calls: list[dict[str, Any]]  # OpenAI's shape: {"id", "type", "function"}


class MessagesPage(Page):
    """A conversation's turns, oldest first."""

    conversation_id: str
    messages: list[StoredMessage]


class Deleted(ResponseModel):
    """How many turns were deleted."""

    conversation_id: str
    deleted: int


def page_parameters(default_limit: int, max_limit: int) -> dict[str, dict[str, Any]]:
    """`limit` and `offset`, as /openapi.json describes them (`_page` reads them)."""
    return {
        "limit": {"type": "integer", "minimum": 1, "maximum": max_limit, "default": default_limit},
        "offset": {"type": "integer", "minimum": 0, "maximum": OFFSET_MAX, "default": 0},
    }


def cursor_parameter() -> dict[str, dict[str, Any]]:
    """`cursor`, as /openapi.json describes it (`_cursor` reads it)."""
    return {
        "cursor": {
            "type": "string",
            "maxLength": CURSOR_MAX_CHARS,
            "description": "A page's `next_cursor`: the page after it. Not with `offset`.",
        }
    }


BAD_PAGE = "limit or offset out of range"
BAD_CURSOR = "cursor: not one a page gave, or given with offset"
NOT_FOUND = "The caller has no such conversation."
STORE_DOWN = "The history store is unavailable."


def add_routes(router: web.UrlDispatcher, caller_of: CallerOf) -> None:
    """`caller_of` tells who asks (core/routes.py's): its tenant scopes every route."""
    api = ConversationRoutes(caller_of)
    router.add_get("/conversations", api.list_conversations)
    router.add_get("/conversations/{conversation_id}/messages", api.list_messages)
    router.add_delete("/conversations/{conversation_id}", api.delete_conversation)


class ConversationRoutes:
    def __init__(self, caller_of: CallerOf) -> None:
        self._caller_of = caller_of

    @operation(
        "List conversations",
        responses={200: ConversationsPage},
        query={**page_parameters(CONVERSATIONS_LIMIT, CONVERSATIONS_MAX), **cursor_parameter()},
        errors={400: BAD_CURSOR, 422: BAD_PAGE, 503: STORE_DOWN},
        tags=["conversations"],
    )
    async def list_conversations(self, request: web.Request) -> web.Response:
        """The caller's conversations, the most recently active first, paged by offset or
        by cursor."""
        limit, offset = _page(request, CONVERSATIONS_LIMIT, CONVERSATIONS_MAX)
        after = _cursor(request)
        tenant = self._caller_of(request).tenant
        found = await _store(request).conversations(tenant, limit, offset, after)
        # With a cursor there is no offset to page on from: only the next cursor.
        paging = _paging(limit, offset, len(found))
        if after is not None:
            paging["next_offset"] = None
        last_page = len(found) < limit
        return json_response(
            {
                "conversations": [_conversation(conversation) for conversation in found],
                **paging,
                "next_cursor": None if last_page else encode_cursor(found[-1].key),
            }
        )

    @operation(
        "A conversation's turns",
        responses={200: MessagesPage},
        query=page_parameters(MESSAGES_LIMIT, MESSAGES_MAX),
        errors={404: NOT_FOUND, 422: BAD_PAGE, 503: STORE_DOWN},
        tags=["conversations"],
    )
    async def list_messages(self, request: web.Request) -> web.Response:
        """A conversation's turns, oldest first, paged; 404 when the caller has none."""
        limit, offset = _page(request, MESSAGES_LIMIT, MESSAGES_MAX)
        tenant = self._caller_of(request).tenant
        conversation_id = request.match_info["conversation_id"]
        store = _store(request)
        found = await store.messages(tenant, conversation_id, limit, offset)
        # An empty page past the end of a conversation that exists is not a 404.
        exists = bool(found) or bool(await store.messages(tenant, conversation_id, 1, 0))
        if not exists:
            raise _not_found(conversation_id)
        return json_response(
            {
                "conversation_id": conversation_id,
                "messages": [_message(record) for record in found],
                **_paging(limit, offset, len(found)),
            }
        )

    @operation(
        "Delete a conversation",
        responses={200: Deleted},
        errors={404: NOT_FOUND, 503: STORE_DOWN},
        tags=["conversations"],
    )
    async def delete_conversation(self, request: web.Request) -> web.Response:
        """Delete a conversation's turns: 200 with how many, or 404 when there were none."""
        tenant = self._caller_of(request).tenant
        conversation_id = request.match_info["conversation_id"]
        deleted = await _store(request).delete_conversation(tenant, conversation_id)
        if not deleted:
            raise _not_found(conversation_id)
        return json_response({"conversation_id": conversation_id, "deleted": deleted})


def _store(request: web.Request) -> HistoryStore:
    return request.app[SERVICE].store


def _page(request: web.Request, default_limit: int, max_limit: int) -> tuple[int, int]:
    """`limit` (1 to `max_limit`) and `offset` (0 or more) from the query string; a bad
    value is a 422 naming the parameter."""
    limit = _query_int(request, "limit", default_limit, 1, max_limit)
    offset = _query_int(request, "offset", 0, 0, OFFSET_MAX)
    return limit, offset


def encode_cursor(key: ListingKey) -> str:
    """Opaque to clients: base64url of the last listed conversation's place."""
    packed = orjson.dumps([key.last_seq, key.conversation_id])
    return base64.urlsafe_b64encode(packed).decode().rstrip("=")


def decode_cursor(cursor: str) -> ListingKey | None:
    """The place `encode_cursor` packed; None for anything else."""
    if len(cursor) > CURSOR_MAX_CHARS:
        return None
    try:
        packed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        last_seq, conversation_id = orjson.loads(packed)
    except (binascii.Error, ValueError, TypeError):  # orjson's JSONDecodeError is a ValueError
        return None
    if type(last_seq) is not int or not isinstance(conversation_id, str):
        return None
    return ListingKey(last_seq, conversation_id)


def _cursor(request: web.Request) -> ListingKey | None:
    """`cursor` from the query string; a bad one (or one beside `offset`) is a 400."""
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if "offset" in request.query:
        raise ApiError(400, "invalid_cursor", "cursor: give cursor or offset, not both",
                       field="cursor")  # fmt: skip
    key = decode_cursor(raw)
    if key is None:
        raise ApiError(400, "invalid_cursor", "cursor: not a cursor a page gave (its"
                       " next_cursor, unchanged)", field="cursor")  # fmt: skip
    return key


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = int(raw) if _INTEGER.fullmatch(raw) else None
    if value is None or not low <= value <= high:
        raise ApiError(
            422,
            "validation_error",
            f"{name}: must be an integer from {low} to {high} (got {raw[:40]!r})",
            field=name,
        )
    return value


def _paging(limit: int, offset: int, count: int) -> dict[str, Any]:
    return {
        "limit": limit,
        "offset": offset,
        "next_offset": offset + count if count == limit else None,
    }


def _not_found(conversation_id: str) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"conversation_id: no conversation '{conversation_id[:128]}'",
        field="conversation_id",
    )


def _conversation(conversation: Conversation) -> dict[str, Any]:
    return {
        "conversation_id": conversation.conversation_id,
        "turns": conversation.turns,
        "first_query": conversation.first_query,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
    }


def _message(record: MessageRecord) -> dict[str, Any]:
    usage = record.usage
    return {
        "message_id": record.message_id,
        "query": record.query,
        "response": record.response,
        "status": str(record.status),
        "model": record.model,
        "usage": None if usage is None else usage.counts(),
        "latency": record.latency,
        "error": record.error,
        # The answer beside its text (reasoning is never in `response`)
        "finish_reason": record.meta.get("finish_reason"),
        "reasoning": record.meta.get("reasoning", ""),
        "tool_calls": record.meta.get("tool_calls", []),
        "feedback": None
        if record.feedback_score == -1
        else {"score": record.feedback_score, "reason": record.feedback_reason},
        "created_at": record.created_at,
    }
