"""core.ids.new_id: what uuid.uuid4().hex gives, laid out the same."""

from __future__ import annotations

import uuid

from core.ids import new_id


def test_an_id_is_a_version_4_uuid_as_32_hex_digits() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for found in ids:
        parsed = uuid.UUID(found)
        assert (parsed.hex, parsed.version, parsed.variant) == (found, 4, uuid.RFC_4122)
