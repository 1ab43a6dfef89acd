"""A real reader of chatbus's stream: a spec-minded SSE parser. chatchat's own client is in
tests/chatchat_client.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Stream:
    status: int
    content_type: str
    frames: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    other_lines: list[str] = field(default_factory=list)  # `event:`, `id:`, ...

    @property
    def text(self) -> str:
        return "".join(frame["text"] for frame in self.frames)

    @property
    def message_ids(self) -> set[str]:
        return {frame["message_id"] for frame in self.frames}


async def read_sse(response: aiohttp.ClientResponse) -> Stream:
    """Parse an event stream line by line; every `data:` event must be one JSON object."""
    stream = Stream(response.status, response.content_type)
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                stream.frames.append(json.loads("\n".join(data)))
                data = []
        elif line.startswith(":"):
            stream.comments.append(line[1:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        else:
            stream.other_lines.append(line)
    assert not data, "the stream ended inside an event"
    return stream
