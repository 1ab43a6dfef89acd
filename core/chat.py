"""The chat service: the flow of one chat, from a valid request to a stored answer.

`ChatService.start` resolves the model and prompt, reads history, stores the new turn and
returns a `ChatTurn`; `ChatTurn.run` streams the model's deltas to a transport's `send` and
records how the turn ended. Nothing here knows HTTP, a store or a provider by name.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pluggy
import structlog

from core.bus import EventBus
from core.config import Config
from core.events import (
    ChatCancelled,
    ChatCompleted,
    ChatFailed,
    ChatReceived,
    ChatStarted,
    Event,
    FeedbackReceived,
)
from core.history import HistoryStore, MessageRecord, Outcome, Status, StoreUnavailable
from core.outbox import Delivery
from core.providers import Message, ModelCall, Provider, ProviderError, Usage
from core.registry import ModelRegistry
from core.schemas import ChatRequest, FeedbackRequest
from core.templates import PromptTemplates
from core.web import ApiError

log = structlog.get_logger("chatbus.chat")
SAVE_RETRY_FIRST, SAVE_RETRY_MAX = 0.5, 30.0  # seconds between tries to store an answer

Send = Callable[[str], Awaitable[None]]


@contextmanager
def _store_available() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable as exc:
        raise ApiError(
            503, "store_unavailable", f"the history store is unavailable ({exc}); try again"
        ) from None


class ClientDisconnected(Exception):
    """Raised by a transport's `send` when the client is gone."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the request id for logs, the tenant that owns what is stored."""

    request_id: str
    tenant: str = "default"


@dataclass(frozen=True, slots=True)
class TurnResult:
    message_id: str
    text: str
    status: Status
    error: ProviderError | None
    model: str  # the model that answered


class ChatService:
    def __init__(
        self,
        *,
        config: Config,
        models: ModelRegistry,
        prompts: PromptTemplates,
        store: HistoryStore,
        bus: EventBus,
        hooks: pluggy.HookRelay,
    ) -> None:
        self.app_config = config
        self.config = config.chat
        self.default_model = config.default_model
        self.models = models
        self.prompts = prompts
        self.store = store
        self.bus = bus
        self._hooks = hooks
        self._background: set[asyncio.Task[Any]] = set()

    async def start(self, request: ChatRequest, caller: Caller) -> ChatTurn:
        """Steps 2-5 of the flow; raises ApiError before anything is stored."""
        model = request.model_name or self.default_model
        if self.models.get(model) is None:
            raise ApiError(
                400,
                "unknown_model",
                f"model_name: unknown model '{model}' (configured: {', '.join(self.models.names)})",
                field="model_name",
            )
        if request.prompt_name not in self.prompts:
            raise ApiError(
                400,
                "unknown_prompt",
                f"prompt_name: unknown prompt"
                f" '{request.prompt_name}' (configured: {', '.join(self.prompts.names)})",
                field="prompt_name",
            )
        if request.callback_url is not None:
            self._check_callback(request.callback_url)
        record = MessageRecord(
            message_id=uuid.uuid4().hex,
            conversation_id=request.conversation_id,
            query=request.query,
            model=model,
            tenant=caller.tenant,
            created_at=time.time(),
            meta={"callback_url": request.callback_url} if request.callback_url else {},
        )
        turn = ChatTurn(self, record, caller.request_id)
        await self.publish(ChatReceived(**turn.ids, model=model, stream=request.stream))
        with _store_available():
            history = await self._history(request, caller.tenant)
        messages = [
            *history,
            {"role": "user", "content": self.prompts.render(request.prompt_name, request.query)},
        ]
        messages = self._hooks.prepare_messages(request=request, messages=messages)
        turn.call = ModelCall(messages, request.temperature, request.max_tokens)
        with _store_available():
            await self.store.add_message(record)
        await self.publish(ChatStarted(**turn.ids, model=model, history_turns=len(history) // 2))
        return turn

    async def feedback(self, request: FeedbackRequest, caller: Caller) -> None:
        with _store_available():
            record = await self.store.set_feedback(
                caller.tenant, request.message_id, request.score, request.reason
            )
        if record is None:
            raise ApiError(
                404,
                "not_found",
                f"message_id: no message '{request.message_id}'",
                field="message_id",
            )
        await self.publish(
            FeedbackReceived(
                message_id=record.message_id,
                conversation_id=record.conversation_id,
                tenant=record.tenant,
                score=request.score,
                reason=request.reason,
            )
        )

    def _check_callback(self, url: str) -> None:
        """Only http(s) URLs on an allowed host: a chat must not make chatbus call anything
        else (server-side request forgery)."""
        allowed = self.config.callback_hosts
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https") or parsed.hostname not in allowed:
            hosts = ", ".join(allowed) or "none: set [chat] callback_hosts"
            raise ApiError(400, "callback_not_allowed", f"callback_url: an http(s) URL on an"
                           f" allowed host is required (allowed: {hosts})",
                           field="callback_url")  # fmt: skip

    def plan(self, event: Event) -> list[Delivery]:
        """What plugins say this event owes the outside world (the outbox)."""
        try:
            planned = self._hooks.plan_deliveries(event=event, config=self.app_config)
        except Exception:
            log.exception("planning deliveries failed", hook=event.hook)
            return []
        return [delivery for deliveries in planned if deliveries for delivery in deliveries]

    async def publish(self, event: Event) -> None:
        """Publish an event that ends no turn; its deliveries go to the outbox first."""
        deliveries = self.plan(event)
        if deliveries:
            try:
                await self.store.add_deliveries(deliveries)
            except Exception:
                log.exception("could not queue deliveries", hook=event.hook,
                              message_id=event.message_id)  # fmt: skip
        self.bus.publish(event)

    async def save_outcome(
        self, message_id: str, outcome: Outcome, deliveries: list[Delivery] | None = None
    ) -> None:
        """Write how a turn ended, with the deliveries its end owes. If the store fails,
        keep trying in the background: the answer is never silently dropped."""
        deliveries = deliveries or []
        try:
            await self.store.finish_message(message_id, outcome, deliveries)
        except Exception as exc:
            log.warning(
                "could not store the end of a turn; retrying",
                message_id=message_id,
                error=repr(exc),
            )
            self.spawn(self._save_later(message_id, outcome, deliveries))

    async def _save_later(
        self, message_id: str, outcome: Outcome, deliveries: list[Delivery]
    ) -> None:
        delay = SAVE_RETRY_FIRST
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self.store.finish_message(message_id, outcome, deliveries)
                except Exception as exc:
                    delay = min(delay * 2, SAVE_RETRY_MAX)
                    log.warning(
                        "could not store the end of a turn; retrying",
                        message_id=message_id,
                        error=repr(exc),
                        next_in=delay,
                    )
                else:
                    log.info("stored the end of a turn after retrying", message_id=message_id)
                    return
        except asyncio.CancelledError:
            # Shutting down while the store still fails: the log is the answer's last copy.
            log.error(
                "could not store the end of a turn before shutting down",
                message_id=message_id,
                status=outcome.status,
                response=outcome.response,
            )
            raise

    async def drain(self, grace: float | None = None) -> None:
        """Wait for turns still being recorded and their events; after `grace` seconds,
        give up on what is left (each says so in the log)."""
        deadline = None if grace is None else time.monotonic() + grace
        while self._background:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            _, pending = await asyncio.wait(self._background, timeout=left)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        await self.bus.drain()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _history(self, request: ChatRequest, tenant: str) -> list[Message]:
        if isinstance(request.history, list) and request.history:
            return [item.model_dump() for item in request.history]
        limit = min(request.turns_to_read(), self.config.max_history_turns)
        if limit == 0:
            return []
        turns = await self.store.recent_turns(tenant, request.conversation_id, limit)
        messages: list[Message] = []
        for turn in turns:
            messages.append({"role": "user", "content": turn.query})
            messages.append({"role": "assistant", "content": turn.response})
        return messages


class ChatTurn:
    """One stored turn on its way: run it once."""

    call: ModelCall

    def __init__(self, service: ChatService, record: MessageRecord, request_id: str) -> None:
        self._service = service
        self.record = record
        self.ids = {
            "message_id": record.message_id,
            "conversation_id": record.conversation_id,
            "tenant": record.tenant,
            "request_id": request_id,
            "query": record.query,
            "callback_url": record.meta.get("callback_url"),
        }

    @property
    def message_id(self) -> str:
        return self.record.message_id

    async def run(self, send: Send | None = None) -> TurnResult:
        """Stream the answer to `send` (if given); store and publish how it ended.

        On cancellation or `ClientDisconnected` the upstream call is closed at once, the
        partial text is recorded as `cancelled` in the background, and the error propagates.
        """
        with structlog.contextvars.bound_contextvars(
            message_id=self.message_id, conversation_id=self.record.conversation_id
        ):
            return await self._run(send)

    async def _run(self, send: Send | None) -> TurnResult:
        answer = _Answer(model=self.record.model, started=time.perf_counter())
        try:
            await self._answer(answer, send)
        except (asyncio.CancelledError, ClientDisconnected):
            self._service.spawn(self._finish(answer, Status.CANCELLED))
            raise
        except ProviderError as exc:
            return await self._finish(answer, Status.FAILED, exc)
        return await self._finish(answer, Status.COMPLETED)

    async def _answer(self, answer: _Answer, send: Send | None) -> None:
        """The model, then its retries, then its fallbacks, until one answers. Once the
        client has text, nothing is retried: a failure then fails the turn."""
        error: ProviderError | None = None
        for route in self._service.models.chain(self.record.model):
            answer.model = route.name
            for attempt in range(route.retries + 1):
                if attempt:
                    assert error is not None
                    await asyncio.sleep(route.delay(attempt, error))
                try:
                    await self._relay(route.provider, answer, send)
                except ProviderError as exc:
                    route.record(exc)
                    if answer.parts:
                        raise
                    error = exc
                    log.warning(
                        "model failed",
                        model=route.name,
                        attempt=attempt + 1,
                        error=exc.type,
                        message_id=self.message_id,
                    )
                    if not exc.retryable:
                        break
                else:
                    route.record(None)
                    return
        assert error is not None
        raise error

    async def _relay(self, provider: Provider, answer: _Answer, send: Send | None) -> None:
        """The hot path: every delta from the provider straight to the transport."""
        parts = answer.parts
        answer.usage = None  # a failed attempt's count is not this one's
        try:
            async with aclosing(provider.stream(self.call)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, str):
                        if not piece:
                            continue  # nothing to send, and not yet an answer
                        if answer.first is None:
                            answer.first = time.perf_counter()
                        parts.append(piece)
                        if send is not None:
                            await send(piece)
                    elif isinstance(piece, Usage):
                        answer.usage = piece
        except (ProviderError, asyncio.CancelledError, ClientDisconnected):
            raise
        except Exception as exc:  # a provider bug must not crash the turn unrecorded
            log.exception("provider crashed", model=answer.model, message_id=self.message_id)
            raise ProviderError(f"the provider failed: {type(exc).__name__}") from None

    async def _finish(
        self, answer: _Answer, status: Status, error: ProviderError | None = None
    ) -> TurnResult:
        text = "".join(answer.parts)
        latency = time.perf_counter() - answer.started
        first_token = answer.first - answer.started if answer.first is not None else None
        outcome = Outcome(
            text, status, answer.usage, latency, error.type if error else None, answer.model
        )
        common = {
            **self.ids,
            "model": answer.model,  # the model that answered, a fallback perhaps
            "text": text,
            "usage": answer.usage,
            "latency": latency,
            "first_token_latency": first_token,
        }
        if error is not None:
            event: ChatCompleted | ChatFailed | ChatCancelled = ChatFailed(
                **common, error_type=error.type, error_message=str(error)
            )
        elif status is Status.CANCELLED:
            event = ChatCancelled(**common)
        else:
            event = ChatCompleted(**common)
        await self._service.save_outcome(self.message_id, outcome, self._service.plan(event))
        self._service.bus.publish(event)
        return TurnResult(self.message_id, text, status, error, answer.model)


@dataclass(slots=True)
class _Answer:
    """What a turn has produced so far."""

    model: str  # the model answering: the requested one, or the fallback trying now
    started: float
    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    first: float | None = None
