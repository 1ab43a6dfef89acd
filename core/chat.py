"""The chat service: the flow of one chat, from a valid request to a stored answer.

`ChatService.start` resolves the model and prompt, reads history, stores the new turn and
returns a `ChatTurn` (core/turn.py), whose `run` streams the model's deltas to a transport's
`send` and records how the turn ended. Nothing here knows HTTP, a store or a provider by
name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pluggy
import structlog

from core.bus import EventBus
from core.config import Config, split_authority
from core.errors import CallbackNotAllowed, MessageNotFound, UnknownModel, UnknownPrompt
from core.events import (
    ChatReceived,
    ChatStarted,
    Event,
    FeedbackReceived,
)
from core.history import HistoryStore, MessageRecord, Outcome
from core.outbox import Delivery
from core.providers import Message, ModelCall, ShuttingDown
from core.registry import ModelRegistry
from core.schemas import ChatRequest
from core.templates import PromptTemplates
from core.turn import ChatTurn

log = structlog.get_logger("chatbus.chat")
DEFAULT_PORTS = {"http": 80, "https": 443}
SAVE_RETRY_FIRST, SAVE_RETRY_MAX = 0.5, 30.0  # seconds between tries to store an answer
# Seconds a shutdown has after the grace for the ends of the answers it cut (their records,
# last frames, events and deliveries); closing the store and the process's exit take part
# of the rest of the second a shutdown may last past its grace.
CLOSE_SECONDS = 0.6
CUT_SHORT = "chatbus is shutting down; the answer was cut short"


def callback_problem(url: str, allowed: set[tuple[str, int | None]]) -> str | None:
    """What keeps `url` from being called back, given the allowed (host, port) pairs (a None
    port: the scheme's default); None when nothing does."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a valid URL"
    default_port = DEFAULT_PORTS.get(parts.scheme)
    if default_port is None or not parts.hostname:
        return "not an http(s) URL"
    if parts.username is not None or parts.password is not None:
        return "credentials (user:pass@) are not allowed in it"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "its port is not valid"
    host = parts.hostname.rstrip(".")
    port = port or default_port
    if (host, port) in allowed or (port == default_port and (host, None) in allowed):
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port} is not allowed"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: the request id for logs, the tenant that owns what is stored."""

    request_id: str
    tenant: str = "default"


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
        instance_id: str = "",
    ) -> None:
        self.app_config = config
        self.instance_id = instance_id  # this process, in the store's leases and its turns
        self.config = config.chat
        self.default_model = config.default_model
        self.models = models
        self.prompts = prompts
        self.store = store
        self.bus = bus
        self._hooks = hooks
        self._background: set[asyncio.Task[Any]] = set()
        self._answers: set[asyncio.Timeout] = set()  # one per answer under way: shutdown's cut
        self._no_answers = asyncio.Event()
        self._no_answers.set()
        self._cutting = False  # the grace is over: an answer is cut as soon as it starts
        self._done_by: float | None = None  # the loop time by which a shutdown is done
        self._callback_targets = {split_authority(entry) for entry in config.chat.callback_hosts}

    @asynccontextmanager
    async def start(self, request: ChatRequest, caller: Caller) -> AsyncIterator[ChatTurn]:
        """Steps 2-5 of the flow, as the scope of the turn's life: raises a ChatError (or
        StoreUnavailable) before anything is stored; inside, the transport runs the turn
        (`await turn.run(send)`, or `spawn(turn.run())` to answer in the background). A
        turn that leaves the scope without having run (the client left, the response could
        not begin, the request was cancelled while its record was being written) is ended
        `cancelled`, once, with its event and deliveries."""
        turn = await self._prepare(request, caller)
        try:
            await self.store.add_message(turn.record)
        except asyncio.CancelledError:
            self.spawn(turn.abandon())  # the write may still land: the end is written after it
            raise
        try:
            ids = turn.identity
            started = ChatStarted(
                message_id=ids.message_id,
                conversation_id=ids.conversation_id,
                tenant=ids.tenant,
                request_id=ids.request_id,
                query=ids.query,
                callback_url=ids.callback_url,
                model=turn.record.model,
                history_turns=turn.history_turns,
            )
            await self.publish(started)
            yield turn
        finally:
            if not turn.claimed:
                self.spawn(turn.abandon())

    async def _prepare(self, request: ChatRequest, caller: Caller) -> ChatTurn:
        """The turn, its model call built; nothing is stored yet."""
        model = request.model_name or self.default_model
        if self.models.get(model) is None:
            raise UnknownModel(model, self.models.names)
        if request.prompt_name not in self.prompts:
            raise UnknownPrompt(request.prompt_name, self.prompts.names)
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
            instance_id=self.instance_id,
        )
        turn = ChatTurn(self, record, caller.request_id)
        ids = turn.identity
        received = ChatReceived(
            message_id=ids.message_id,
            conversation_id=ids.conversation_id,
            tenant=ids.tenant,
            request_id=ids.request_id,
            query=ids.query,
            callback_url=ids.callback_url,
            model=model,
            stream=request.stream,
        )
        await self.publish(received)
        history = await self._history(request, caller.tenant)
        messages = [
            *history,
            {"role": "user", "content": self.prompts.render(request.prompt_name, request.query)},
        ]
        messages = self._hooks.prepare_messages(request=request, messages=messages)
        turn.call = ModelCall(messages, request.temperature, request.max_tokens)
        turn.history_turns = sum(message["role"] != "system" for message in history) // 2
        return turn

    async def feedback(self, caller: Caller, message_id: str, score: int, reason: str) -> None:
        """Rate one of the caller's answers; MessageNotFound when it has no such message."""
        record = await self.store.set_feedback(caller.tenant, message_id, score, reason)
        if record is None:
            raise MessageNotFound(message_id)
        await self.publish(
            FeedbackReceived(
                message_id=record.message_id,
                conversation_id=record.conversation_id,
                tenant=record.tenant,
                score=score,
                reason=reason,
            )
        )

    def _check_callback(self, url: str) -> None:
        """Only http(s) URLs on an allowed host and port, with no credentials: a chat must
        not make chatbus call anything else (server-side request forgery)."""
        problem = callback_problem(url, self._callback_targets)
        if problem is not None:
            raise CallbackNotAllowed(problem, self.config.callback_hosts)

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
                await self.store.outbox.add_deliveries(deliveries)
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
            # Shutting down while the store still fails: the turn stays `streaming` under
            # this instance, whose lease expires, and a live instance ends it `interrupted`
            # with the answer as far as its last checkpoint.
            log.error(
                "could not store the end of a turn before shutting down",
                message_id=message_id,
                status=outcome.status,
                answer_chars=len(outcome.response),  # never the text: a log is no store
            )
            raise

    @asynccontextmanager
    async def answering(self) -> AsyncIterator[None]:
        """Around a turn's answer: once a shutdown's grace has run out, it is cut short with
        `ShuttingDown` (at once if it starts after that)."""
        cut = asyncio.timeout(0 if self._cutting else None)
        self._answers.add(cut)
        self._no_answers.clear()
        try:
            async with cut:
                yield
        except TimeoutError:
            if not cut.expired():
                raise
            raise ShuttingDown(CUT_SHORT) from None
        finally:
            self._answers.discard(cut)
            if not self._answers:
                self._no_answers.set()

    async def stop_answering(self, grace: float) -> None:
        """Shutdown, once nothing new is accepted: let the answers under way finish for up
        to `grace` seconds, then cut the rest short (their transports say so, their turns are
        stored `cancelled`). What is left of the shutdown is `time_left()`."""
        loop = asyncio.get_running_loop()
        self._done_by = loop.time() + grace + CLOSE_SECONDS
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._no_answers.wait()
        self._cutting = True
        if self._answers:
            log.warning("the grace ran out: cutting answers short", count=len(self._answers))
        for cut in self._answers:
            if not cut.expired():
                cut.reschedule(loop.time())

    def time_left(self) -> float:
        """Seconds left of a shutdown; before one begins (the CLI's), the whole of it."""
        if self._done_by is None:
            return self.app_config.server.shutdown_grace_seconds + CLOSE_SECONDS
        return max(self._done_by - asyncio.get_running_loop().time(), 0.0)

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
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        try:
            async with asyncio.timeout(left):
                await self.bus.drain()
        except TimeoutError:
            log.warning("gave up on event subscribers still running at shutdown")

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _history(self, request: ChatRequest, tenant: str) -> list[Message]:
        """The client's history list, then the stored turns it asks for (see turns_to_read)."""
        given = request.history if isinstance(request.history, list) else []
        messages: list[Message] = [item.model_dump() for item in given]
        limit = min(request.turns_to_read(), self.config.max_history_turns)
        if limit == 0:
            return messages
        turns = await self.store.recent_turns(tenant, request.conversation_id, limit)
        for turn in turns:
            messages.append({"role": "user", "content": turn.query})
            messages.append({"role": "assistant", "content": turn.response})
        return messages
