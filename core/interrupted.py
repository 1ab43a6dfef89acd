"""The turns of a dead instance: each turn still `streaming` whose instance's lease expired
(kill -9, a lost machine; core/instances.py) is claimed by a live instance and ended
`interrupted`, keeping the answer as far as its last checkpoint, and published as
`chat_failed` of type `interrupted`, so that its webhooks and callback go out."""

from __future__ import annotations

import time

import structlog

from core.chat import ChatService
from core.events import ChatFailed
from core.history import MessageRecord, Outcome, Status, StoreUnavailable

log = structlog.get_logger("chatbus.chat")
SWEEP_BATCH = 100  # orphaned turns claimed at a time
INTERRUPTED = "interrupted"  # the error type of a turn whose instance died


async def end_interrupted(service: ChatService) -> int:
    """Claim the turns whose instance holds no lease and end each one `interrupted`, as any
    failed turn ends (stored with its deliveries, retried if the store fails, published).
    How many were ended."""
    ended: set[str] = set()
    try:
        while records := await service.store.claim_orphaned_turns(
            service.instance_id, time.time(), SWEEP_BATCH
        ):
            fresh = [record for record in records if record.message_id not in ended]
            for record in fresh:
                await _end_one(service, record)
                ended.add(record.message_id)
            if len(fresh) < len(records):
                break  # an end is still being retried: claimed again, it is not ended twice
    except StoreUnavailable as exc:
        log.warning("could not end interrupted turns: the store is unavailable",
                    error=str(exc), ended=len(ended))  # fmt: skip
    if ended:
        log.info("ended interrupted turns", count=len(ended))
    return len(ended)


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
    await service.recorder.end(outcome, event)
