"""Random ids: a turn's message id, a request's id, a delivery's id."""

from __future__ import annotations

import os


def new_id() -> str:
    """128 random bits as 32 hex digits, laid out as a version-4 UUID's (what
    `uuid.uuid4().hex` gives, and chatchat's message ids are), without building a UUID
    object: a chat makes several, and uuid4 costs more than the rest of its bookkeeping."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # the RFC 4122 variant
    return raw.hex()
