"""What streaming transports share: a `send` that writes one frame per delta."""

from __future__ import annotations

import orjson
from aiohttp import web

from core.turn import ClientDisconnected, Send


def frame_sender(response: web.StreamResponse, head: bytes, tail: bytes) -> Send:
    """Each delta JSON-encoded between a pre-encoded `head` and `tail` (one encode, one write
    a frame); a client that is gone becomes `ClientDisconnected`, which cancels the turn."""

    async def send(text: str) -> None:
        try:
            await response.write(head + orjson.dumps(text) + tail)
        except ConnectionResetError as exc:
            raise ClientDisconnected from exc

    return send
