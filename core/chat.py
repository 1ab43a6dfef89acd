"""The chat service: the flow of one chat, from a valid request to a stored answer.

`ChatService.start` resolves the model and prompt, reads history, stores the new turn and
returns a `ChatTurn` (core/turn.py), whose `run` streams the model's deltas to a transport's
`send` and records how the turn ended. Nothing here knows HTTP, a store or a provider by
name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pluggy
import structlog

from core.bus import EventBus
from core.chat_input import ChatInput
from core.config import Config
from core.cutoff import Cutoff
from core.errors import CallbackNotAllowed, MessageNotFound, UnknownModel, UnknownPrompt
from core.events import ChatReceived, ChatStarted, FeedbackReceived
from core.history import HistoryStore, MessageRecord
from core.ids import new_id
from core.providers import Message, ModelCall
from core.recorder import Recorder
from core.registry import ModelRegistry
from core.templates import PromptTemplates
from core.turn import ChatTurn, TurnServices

log = structlog.get_logger("chatbus.chat")


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
        self.instance_id = instance_id  # this process, in the store's leases and its turns
        self.config = config.chat
        self.default_model = config.default_model
        self.models = models
        self.prompts = prompts
        self.store = store
        self._hooks = hooks
        self.recorder = Recorder(store=store, bus=bus, hooks=hooks, config=config)
        self.cutoff = Cutoff(config.server.shutdown_grace_seconds)
        self._turns = TurnServices(models, self.recorder, self.cutoff, config.chat)
        self._config = config

    @asynccontextmanager
    async def start(self, request: ChatInput, caller: Caller) -> AsyncIterator[ChatTurn]:
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
            # The write may still land: the end is written after it.
            self.recorder.spawn(turn.abandon())
            raise
        try:
            started = turn.identity.event(
                ChatStarted, model=turn.record.model, history_turns=turn.history_turns
            )
            await self.recorder.publish(started)
            yield turn
        finally:
            if not turn.claimed:
                self.recorder.spawn(turn.abandon())

    async def _prepare(self, request: ChatInput, caller: Caller) -> ChatTurn:
        """The turn, its model call built; nothing is stored yet."""
        model = request.model or self.default_model
        if self.models.get(model) is None:
            raise UnknownModel(model, self.models.names)
        if request.prompt_name not in self.prompts:
            raise UnknownPrompt(request.prompt_name, self.prompts.names)
        if request.callback_url is not None:
            self._check_callback(request.callback_url)
        record = MessageRecord(
            message_id=new_id(),
            conversation_id=request.conversation_id,
            query=request.query,
            model=model,
            tenant=caller.tenant,
            created_at=time.time(),
            meta=_meta(request),
            instance_id=self.instance_id,
        )
        turn = ChatTurn(self._turns, record, caller.request_id)
        received = turn.identity.event(ChatReceived, model=model, stream=request.stream)
        await self.recorder.publish(received)
        history = await self._history(request, caller.tenant)
        messages = [*history, *self._new_messages(request)]
        messages = self._hooks.prepare_messages(request=request, messages=messages)
        turn.call = ModelCall.of(messages, request.params)
        turn.history_turns = sum(message["role"] != "system" for message in history) // 2
        return turn

    def _new_messages(self, request: ChatInput) -> list[Message]:
        """What this turn adds: the tool results it answers, or the user's query rendered
        through the prompt template, with its attachments."""
        if request.tool_results:
            return list(request.tool_results)
        text = self.prompts.render(request.prompt_name, request.query)
        if not request.attachments:
            return [{"role": "user", "content": text}]
        return [{"role": "user", "content": [{"type": "text", "text": text}, *request.attachments]}]

    async def feedback(self, caller: Caller, message_id: str, score: int, reason: str) -> None:
        """Rate one of the caller's answers; MessageNotFound when it has no such message."""
        record = await self.store.set_feedback(caller.tenant, message_id, score, reason)
        if record is None:
            raise MessageNotFound(message_id)
        await self.recorder.publish(
            FeedbackReceived(
                message_id=record.message_id,
                conversation_id=record.conversation_id,
                tenant=record.tenant,
                score=score,
                reason=reason,
            )
        )

    def _check_callback(self, url: str) -> None:
        """A URL the plugin that delivers callbacks accepts: it allows only what a chat may
        make chatbus call (no server-side request forgery)."""
        if not self._hooks.check_callback.get_hookimpls():
            raise CallbackNotAllowed("no plugin here delivers callbacks")
        problems = self._hooks.check_callback(url=url, config=self._config)
        if any(problems):
            raise CallbackNotAllowed(next(problem for problem in problems if problem))

    async def _history(self, request: ChatInput, tenant: str) -> list[Message]:
        """The client's history, then the stored turns it asks for (`history_len`)."""
        messages: list[Message] = list(request.history)
        limit = min(request.history_len, self.config.max_history_turns)
        if limit <= 0 or not request.conversation_id:
            return messages
        for turn in await self.store.recent_turns(tenant, request.conversation_id, limit):
            messages.extend(turn.messages())
        return messages


def _meta(request: ChatInput) -> dict[str, Any]:
    """What the record keeps beside the query: where to call back, the tool results the turn
    answers (replayed with it as history)."""
    meta: dict[str, Any] = {}
    if request.callback_url:
        meta["callback_url"] = request.callback_url
    if request.tool_results:
        meta["tool_results"] = list(request.tool_results)
    return meta
