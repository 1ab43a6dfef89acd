"""One turn on its way: the model, its retries and fallbacks, the relay of every delta to
the transport, and how the turn ended, stored and published."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager, aclosing, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import structlog

from core.checkpoints import Checkpoints
from core.config import ChatConfig
from core.cutoff import Cutoff
from core.events import ChatCancelled, ChatCompleted, ChatEvent, ChatFailed
from core.history import MessageRecord, Outcome, Status
from core.logs import log_context
from core.providers import (
    AnswerTimeout,
    AnswerTooLong,
    Finish,
    ModelCall,
    ProviderError,
    Reasoning,
    ShuttingDown,
    ToolCallDelta,
    Usage,
)
from core.recorder import Recorder
from core.registry import Failure, ModelRegistry, Route

log = structlog.get_logger("chatbus.chat")

Send = Callable[[str], Awaitable[None]]
# What a transport that shows more than text is handed besides: reasoning, tool-call pieces.
SendChunk = Callable[[Reasoning | ToolCallDelta], Awaitable[None]]
T = TypeVar("T")
E = TypeVar("E", bound=ChatEvent)


class ClientDisconnected(Exception):
    """Raised by a transport's `send` when the client is gone."""


@dataclass(frozen=True, slots=True)
class TurnResult:
    message_id: str
    text: str
    status: Status
    error: ProviderError | None
    model: str  # the model that answered
    failures: tuple[Failure, ...] = ()  # the attempts before it, in order
    finish_reason: str | None = None  # a completed turn's: `stop`, `length`, `tool_calls`, ...
    reasoning: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # OpenAI's shape: {"id", "type", "function"}


@dataclass(frozen=True, slots=True)
class TurnIdentity:
    """Who and what a turn is: the fields every event of its chat carries."""

    message_id: str
    conversation_id: str
    tenant: str
    request_id: str
    query: str
    callback_url: str | None  # async mode: where the end of the chat is delivered

    def event(self, kind: type[E], **more: Any) -> E:
        """An event of this turn's chat: its identity, and the fields of the kind's own."""
        return kind(
            message_id=self.message_id,
            conversation_id=self.conversation_id,
            tenant=self.tenant,
            request_id=self.request_id,
            query=self.query,
            callback_url=self.callback_url,
            **more,
        )


@dataclass(frozen=True, slots=True)
class TurnServices:
    """What every turn uses, shared: the models (with their retries and fallbacks), the
    recorder of its end and events, the shutdown's cut-off, and [chat]'s limits."""

    models: ModelRegistry
    recorder: Recorder
    cutoff: Cutoff
    config: ChatConfig


class ChatTurn:
    """One stored turn on its way: run it once."""

    call: ModelCall
    history_turns: int = 0  # the past turns sent with the query

    def __init__(self, services: TurnServices, record: MessageRecord, request_id: str) -> None:
        self._services = services
        self.record = record
        self.claimed = False  # a run (or abandon) owns the turn's end from then on
        self.identity = TurnIdentity(
            message_id=record.message_id,
            conversation_id=record.conversation_id,
            tenant=record.tenant,
            request_id=request_id,
            query=record.query,
            callback_url=record.meta.get("callback_url"),
        )

    @property
    def message_id(self) -> str:
        return self.record.message_id

    def run(
        self, send: Send | None = None, send_chunk: SendChunk | None = None
    ) -> Coroutine[Any, Any, TurnResult]:
        """Stream the answer's text to `send` (if given), its reasoning and tool-call pieces
        to `send_chunk` (if given: a transport that shows text only leaves them out); store
        and publish how it ended. Await it, or spawn it: from this call on, the run owns the
        turn's end.

        On cancellation or `ClientDisconnected` the upstream call is closed at once, the
        partial text is recorded as `cancelled` in the background, and the error propagates.
        """
        self.claimed = True
        return self._logged(self._run(send, send_chunk))

    def run_in_background(self) -> None:
        """Run the turn with no one to send to (its end goes to the callback); shutdown's
        drain waits for it."""
        self._services.recorder.spawn(self.run())

    async def abandon(self) -> None:
        """End a turn that never ran: `cancelled`, with no answer (see ChatService.start)."""
        if self.claimed:
            return
        self.claimed = True
        await self._logged(self._finish(_Answer(self.record.model, time.perf_counter()),
                                         Status.CANCELLED))  # fmt: skip

    async def _logged(self, work: Coroutine[Any, Any, T]) -> T:
        with log_context(message_id=self.message_id, conversation_id=self.record.conversation_id):
            return await work

    async def _run(self, send: Send | None, send_chunk: SendChunk | None) -> TurnResult:
        answer = _Answer(model=self.record.model, started=time.perf_counter())
        try:
            await self._answer(answer, send, send_chunk)
        except (asyncio.CancelledError, ClientDisconnected):
            self._services.recorder.spawn(self._finish(answer, Status.CANCELLED))
            raise
        except ShuttingDown as exc:  # cut short by a shutdown: the transport says why
            return await self._finish(answer, Status.CANCELLED, exc)
        except ProviderError as exc:
            return await self._finish(answer, Status.FAILED, exc)
        return await self._finish(answer, Status.COMPLETED)

    async def _answer(
        self, answer: _Answer, send: Send | None, send_chunk: SendChunk | None
    ) -> None:
        """The answer within its time limit: the requested model's (or [chat]'s), for the
        whole of it, retries and fallbacks included, so that a turn has one bound."""
        seconds = self._time_limit()
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline, self._services.cutoff.answering():
                with self._checkpoints(answer):
                    await self._try_models(answer, send, send_chunk)
        except TimeoutError:
            if not deadline.expired():
                raise
            log.warning("answer timed out", model=answer.model, seconds=seconds)
            raise AnswerTimeout(f"the answer took longer than the limit of {seconds:g} s") from None

    async def _try_models(
        self, answer: _Answer, send: Send | None, send_chunk: SendChunk | None
    ) -> None:
        """The model, then its retries, then its fallbacks, until one answers. Once the
        client has something of the answer, nothing is retried: a failure then fails the
        turn."""

        async def attempt(route: Route) -> None:
            answer.model = route.name
            await self._relay(route, answer, send, send_chunk)

        await self._services.models.answer(
            self.record.model, attempt, answer.began, answer.failures
        )

    async def _relay(
        self, route: Route, answer: _Answer, send: Send | None, send_chunk: SendChunk | None
    ) -> None:
        """The hot path: every delta from the provider straight to the transport, until the
        answer passes its size limit (the delta that would pass it is not sent). Text comes
        first and costs one isinstance; reasoning and tool-call pieces count toward the limit
        too (they are held in memory as well)."""
        parts = answer.parts
        answer.usage = None  # a failed attempt's count is not this one's
        answer.finish = None
        limit = self._size_limit(route)
        size = 0  # characters: an attempt starts with nothing (none is retried after output)
        try:
            async with aclosing(route.provider.stream(self.call)) as pieces:
                async for piece in pieces:
                    if isinstance(piece, str):
                        if not piece:
                            continue  # nothing to send, and not yet an answer
                        size += len(piece)
                        if size > limit:
                            raise AnswerTooLong(
                                f"the answer passed the limit of {limit} characters"
                            )
                        if answer.first is None:
                            answer.first = time.perf_counter()
                        parts.append(piece)
                        if send is not None:
                            await send(piece)
                    elif isinstance(piece, Usage):
                        answer.usage = piece
                    elif isinstance(piece, (Reasoning, ToolCallDelta)):
                        size += _size(piece)
                        if size > limit:
                            raise AnswerTooLong(
                                f"the answer passed the limit of {limit} characters"
                            )
                        piece = answer.absorb(piece, self.message_id)
                        if send_chunk is not None:
                            await send_chunk(piece)
                    elif isinstance(piece, Finish):
                        answer.finish = piece.reason
        except (ProviderError, asyncio.CancelledError, ClientDisconnected):
            raise
        except Exception as exc:  # a provider bug must not crash the turn unrecorded
            log.exception("provider crashed", model=answer.model, message_id=self.message_id)
            raise ProviderError(f"the provider failed: {type(exc).__name__}") from None

    def _checkpoints(self, answer: _Answer) -> AbstractContextManager[object]:
        interval = self._services.config.checkpoint_seconds
        if not interval:
            return nullcontext()
        recorder, message_id = self._services.recorder, self.message_id
        return Checkpoints(
            answer.parts, interval, lambda text: recorder.checkpoint(message_id, text)
        )

    def _size_limit(self, route: Route) -> int:
        own = route.max_answer_chars
        return self._services.config.max_answer_chars if own is None else own

    def _time_limit(self) -> float:
        route = self._services.models.get(self.record.model)
        own = route.answer_timeout_seconds if route is not None else None
        return self._services.config.answer_timeout_seconds if own is None else own

    async def _finish(
        self, answer: _Answer, status: Status, error: ProviderError | None = None
    ) -> TurnResult:
        text = "".join(answer.parts)
        latency = time.perf_counter() - answer.started
        first_token = answer.first - answer.started if answer.first is not None else None
        finish = answer.finish_reason() if status is Status.COMPLETED else None
        reasoning = "".join(answer.reasoning)
        tool_calls = answer.tool_calls()
        outcome = Outcome(
            text,
            status,
            answer.usage,
            latency,
            error.type if error else None,
            answer.model,
            finish_reason=finish,
            reasoning=reasoning,
            tool_calls=tool_calls,
        )
        event = self._end_event(outcome, error, first_token)
        await self._services.recorder.end(outcome, event)
        return TurnResult(
            self.message_id, text, status, error, answer.model, tuple(answer.failures),
            finish, reasoning, tool_calls,
        )  # fmt: skip

    def _end_event(
        self, outcome: Outcome, error: ProviderError | None, first_token: float | None
    ) -> ChatCompleted | ChatFailed | ChatCancelled:
        ended = {
            "model": outcome.model,  # the model that answered, a fallback perhaps
            "text": outcome.response,
            "usage": outcome.usage,
            "latency": outcome.latency,
            "first_token_latency": first_token,
            "tool_calls": outcome.tool_calls,
        }
        if outcome.status is Status.CANCELLED:
            return self.identity.event(ChatCancelled, **ended)
        if error is not None:
            return self.identity.event(
                ChatFailed, **ended, error_type=error.type, error_message=str(error)
            )
        return self.identity.event(ChatCompleted, **ended, finish_reason=outcome.finish_reason)


@dataclass(slots=True)
class _ToolCall:
    """One tool call of the answer, its pieces joined."""

    id: str
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def as_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": "".join(self.arguments)}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(slots=True)
class _Answer:
    """What a turn has produced so far."""

    model: str  # the model answering: the requested one, or the fallback trying now
    started: float
    parts: list[str] = field(default_factory=list)
    usage: Usage | None = None
    first: float | None = None
    failures: list[Failure] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, _ToolCall] = field(default_factory=dict)
    finish: str | None = None  # as the provider said

    def began(self) -> bool:
        """Whether the client may have something of the answer (then nothing is retried)."""
        return bool(self.parts or self.reasoning or self.calls)

    def absorb(
        self, piece: Reasoning | ToolCallDelta, message_id: str
    ) -> Reasoning | ToolCallDelta:
        """Keep a reasoning or tool-call piece; the piece to send on, to spec: a call's id
        and name on its first piece only (an id made up if the upstream sent none: a client
        needs one to answer the call)."""
        if self.first is None:
            self.first = time.perf_counter()
        if isinstance(piece, Reasoning):
            self.reasoning.append(piece.text)
            return piece
        call = self.calls.get(piece.index)
        if call is None:
            call_id = piece.id or f"call_{message_id[:12]}_{piece.index}"
            call = self.calls[piece.index] = _ToolCall(call_id, piece.name or "")
            if piece.id is None:
                piece = replace(piece, id=call_id)
        elif piece.id is not None or piece.name is not None:
            # Some upstreams repeat them on every piece; clients join what comes again.
            piece = replace(piece, id=None, name=None)
        if piece.arguments:
            call.arguments.append(piece.arguments)
        return piece

    def tool_calls(self) -> tuple[dict[str, Any], ...]:
        if not self.calls:  # most answers: nothing to sort
            return ()
        return tuple(self.calls[index].as_openai() for index in sorted(self.calls))

    def finish_reason(self) -> str:
        if self.finish:
            return self.finish
        return "tool_calls" if self.calls else "stop"


def _size(piece: Reasoning | ToolCallDelta) -> int:
    """Characters a piece adds to what the turn holds."""
    if isinstance(piece, Reasoning):
        return len(piece.text)
    return len(piece.arguments) + len(piece.name or "")
