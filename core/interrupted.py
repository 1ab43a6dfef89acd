"""The turns a crash left unfinished: at start-up, each one still `streaming` from before is
ended `interrupted`, keeping the answer as far as its last checkpoint, and published as
`chat_failed` of type `interrupted`, so that its webhooks and callback go out."""

from __future__ import annotations

import time

import structlog

from core.chat import ChatService
from core.events import ChatFailed
from core.history import MessageRecord, Outcome, Status, StoreUnavailable

log = structlog.get_logger("chatbus.chat")
SWEEP_BATCH = 100  # interrupted turns read at a time
INTERRUPTED = "interrupted"  # the error type of a turn a crash left unfinished


async def end_interrupted(service: ChatService, started_before: float) -> None:
    """End the turns a crash left `streaming` (those that started before this time):
    each is stored `interrupted`, with the answer as far as its last checkpoint, and
    published as `chat_failed` of type `interrupted`, so its webhooks and callback go
    out as for any failed turn."""
    ended = 0
    try:
        while records := await service.store.streaming_turns(started_before, SWEEP_BATCH):
            done = 0
            for record in records:
                try:
                    await _end_one(service, record)
                    done += 1
                except StoreUnavailable:
                    raise
                except Exception:  # one bad record must not stop the others, or start-up
                    log.exception("could not end an interrupted turn",
                                  message_id=record.message_id)  # fmt: skip
            ended += done
            if done < len(records):
                break  # what failed would come first again: left to the next start-up
    except StoreUnavailable as exc:
        log.warning("could not end interrupted turns: the store is unavailable",
                    error=str(exc), ended=ended)  # fmt: skip
        return
    if ended:
        log.info("ended interrupted turns", count=ended)


async def _end_one(service: ChatService, record: MessageRecord) -> None:
    latency = max(time.time() - record.created_at, 0.0)
    event = ChatFailed(
        message_id=record.message_id,
        conversation_id=record.conversation_id,
        tenant=record.tenant,
        request_id="",  # the request is gone with the process that served it
        model=record.model,
        query=record.query,
        callback_url=record.meta.get("callback_url"),
        text=record.response,
        usage=None,
        latency=latency,
        first_token_latency=None,
        error_type=INTERRUPTED,
        error_message="chatbus stopped before the answer ended (the process exited or"
        " was killed); the answer is kept as far as its last checkpoint",
    )
    outcome = Outcome(record.response, Status.INTERRUPTED, None, latency, INTERRUPTED)
    await service.recorder.end(outcome, event, retry=False)
