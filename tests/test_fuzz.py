"""Nothing a client sends is a 5xx, and nothing is stored for a request that was refused.

Requests come from a seeded random generator (the same tables on every run), written as
raw bytes on loopback so that headers, framing and encodings can be wrong too: for each
route, at least 500 bodies and header sets, mixing well-formed requests with broken ones.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import sqlite3
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from core.history import MessageRecord, Status
from tests.conftest import Chatbus, StartChatbus, webhook_settings

SEED = 12
PER_ROUTE = 500
BOUND = 10.0  # seconds for one answer; the body timeout below is far shorter

KNOWN_ID = "fuzz-known-message"  # stored before the run: feedback on it is a 200
STRANGE = [
    None, True, False, 0, -1, 1, 2**63, -(2**63), 1e308, -0.0, 0.5, 2.5, "", "x", "-1",
    "1e9", "\ud800", [], {}, [1], {"a": 1}, "http://[a/", "null",
]  # fmt: skip
CALLBACKS = [
    "http://127.0.0.1:9/h", "http://[a/", "http://127.0.0.1:99999/", "http://u:p@127.0.0.1:9/",
    "http://127.0.0.1:x/", "ftp://127.0.0.1:9/", "http://[::1]:9/", "http:///", "//127.0.0.1:9",
    "http://127.0.0.1:9/" + "a" * 3000, "javascript:alert(1)", "",
]  # fmt: skip
CONTENT_TYPES = [
    "application/json", "application/json; charset=utf-8", "application/JSON;charset=latin-1",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b",
    "application/json; boundary", ";", "application/", "*/*",
]  # fmt: skip
HOSTS = ["127.0.0.1", "localhost:1", "[::1]:7861", "attacker.example", "", "a b", "127.0.0.1:x"]
ENCODINGS = ["gzip", "deflate", "br", "zstd", "identity", "gzip, deflate", "x-bogus", "GZIP"]


# Per route and field: (values the route accepts, values it must refuse).
FIELDS: dict[str, dict[str, tuple[list[Any], list[Any]]]] = {
    "/chat/chat": {
        "query": (["hi", "{{ x }}", "{% if %}", "\u00e9t\u00e9", "\U0001f600", "a" * 300], ["", 5]),
        "conversation_id": (["", "c1", "c/2", "\u00e9"], [None, 3]),
        "history_len": ([-1, 0, 3, 10**12], ["x", 0.5]),
        "history": ([[], 2, [{"role": "user", "content": "x"}]], [[{"role": "bot"}], "x", [None]]),
        "stream": ([True, False], ["yes"]),
        "model_name": (["echo"], ["", "nope", None]),
        "temperature": ([0.0, 0.7, 2.0], [2.1, -1, "hot"]),
        "max_tokens": ([None, 0, 5, -5], [10**30, "x"]),
        "prompt_name": (["default", "py"], ["nope"]),
        "callback_url": (["http://127.0.0.1:9/h", "http://[::1]:9/h"], CALLBACKS),
    },
    "/v1/chat/completions": {
        "model": (["echo"], ["nope", "", None]),
        "messages": (
            [
                [{"role": "user", "content": "hi"}],
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                [{"role": "user", "content": [{"type": "text", "text": "t"}]}],
            ],
            [[{"role": "tool", "content": "x"}], [], "hi", [{"role": "user"}]],
        ),
        "stream": ([True, False], ["x"]),
        "stream_options": ([None, {"include_usage": True}], [3]),
        "temperature": ([0, 1.5], [3, "x"]),
        "max_tokens": ([None, 1, 50], [-1, 10**30]),
        "n": ([1], [2, 0]),
        "conversation_id": (["", "c1"], [5]),
    },
    "/chat/feedback": {
        "message_id": ([KNOWN_ID], ["", "nope", "a" * 100, 3]),
        "score": ([0, 50, 100], [101, -1, "5", 1.5]),
        "reason": (["", "good", "r" * 5000], [None, 1]),
    },
}
REQUIRED = {"/chat/chat": {"query"}, "/v1/chat/completions": {"model", "messages"}}


def body_for(route: str, rng: random.Random) -> Any:
    """A JSON object shaped like what the route reads, now and then with a field wrong."""
    body = {}
    for name, (good, bad) in FIELDS[route].items():
        if name in REQUIRED.get(route, ()) or name == "message_id" or rng.random() < 0.5:
            body[name] = rng.choice(bad if rng.random() < 0.06 else good)
    if rng.random() < 0.05:
        body.pop(rng.choice(sorted(body)), None)
    if rng.random() < 0.05:
        body[rng.choice(sorted(FIELDS[route]))] = rng.choice(STRANGE)
    if rng.random() < 0.05:
        body[rng.choice(["extra", "", "\u00e9", "__proto__"])] = rng.choice(STRANGE)
    return body


def raw_body(value: Any, rng: random.Random) -> bytes:
    """The value's JSON, or something a JSON parser chokes on."""
    encoded = json.dumps(value).encode()  # a lone surrogate goes out as \ud800
    kind = rng.random()
    if kind < 0.85:
        return encoded
    return rng.choice(
        [
            encoded[: rng.randint(0, len(encoded))],  # truncated
            b"",
            b"[" * 2000 + b"]" * 2000,  # deep nesting
            b'{"query": "\\ud800"}',  # a lone surrogate
            b'{"query": "\xff\xfe"}',  # not UTF-8
            b'{"query": NaN}',
            b"\x00" * 10,
            b'"just a string"',
            b"1e999",
            rng.randbytes(rng.randint(1, 64)),
        ]
    )


def encode(body: bytes, headers: dict[str, str], rng: random.Random) -> bytes:
    """Maybe declare a Content-Encoding: with the body encoded, or not at all."""
    if rng.random() > 0.1:
        return body
    encoding = rng.choice(ENCODINGS)
    headers["Content-Encoding"] = encoding
    if rng.random() < 0.5 and encoding in ("gzip", "GZIP"):
        return gzip.compress(body)
    if rng.random() < 0.5 and encoding == "deflate":
        return zlib.compress(body)
    return body


def frame(method: str, target: str, headers: dict[str, str], body: bytes, rng: random.Random):
    """The request as bytes, its framing sometimes wrong (chunked or not, a length off)."""
    framing = rng.random()
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    if framing < 0.06 and body:
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        if rng.random() < 0.5:
            chunked = rng.choice([b"zz\r\n" + body, b"%x\r\n%s" % (len(body) + 5, body)])
        lines.append("Transfer-Encoding: chunked")
        wire = chunked
    else:
        length = len(body)
        if framing < 0.1:
            length = max(0, length + rng.choice([-3, 7]))  # off: the next request, or a wait
        if body or method == "POST" or framing < 0.1:
            lines.append(f"Content-Length: {length}")
        wire = body
    lines.append("Connection: close")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + wire


def headers_for(rng: random.Random, with_body: bool) -> dict[str, str]:
    headers = {"Host": rng.choice(HOSTS) if rng.random() < 0.08 else "127.0.0.1"}
    if with_body and rng.random() < 0.95:
        headers["Content-Type"] = (
            "application/json" if rng.random() < 0.85 else rng.choice(CONTENT_TYPES)
        )
    extras = {
        "X-Request-Id": lambda: rng.choice(["r-1", "", "a" * 200, "<script>", "\u00e9"]),
        "Authorization": lambda: rng.choice(["Bearer ", "Bearer x", "Basic Zm9v", "x" * 50]),
        "Accept": lambda: rng.choice(["*/*", "text/event-stream", "", "application/json;q=x"]),
        "Expect": lambda: rng.choice(["100-continue", "100-continue", "100-continue", "bogus"]),
        "Cookie": lambda: rng.choice(["a=b", ";;;", "x" * 100]),
        "Range": lambda: rng.choice(["bytes=0-1", "bytes=x"]),
    }
    for name in rng.sample(sorted(extras), k=rng.choice([0, 0, 1, 2])):
        headers[name] = extras[name]()
    return headers


def post(route: str) -> Callable[[random.Random], bytes]:
    def make(rng: random.Random) -> bytes:
        headers = headers_for(rng, with_body=True)
        body = encode(raw_body(body_for(route, rng), rng), headers, rng)
        return frame("POST", route, headers, body, rng)

    return make


def get(target: Callable[[random.Random], str], method: str = "GET"):
    def make(rng: random.Random) -> bytes:
        headers = headers_for(rng, with_body=rng.random() < 0.1)
        body = rng.choice([b"", b"", b"", b"{}", b"garbage"])
        return frame(method, target(rng), headers, body, rng)

    return make


def query(rng: random.Random) -> str:
    params = {
        "limit": ["0", "1", "20", "101", "-1", "x", "", "1e3", "9" * 30],
        "offset": ["0", "5", "-1", "x", "9" * 30, " 1"],
        "other": ["a", "%ZZ", "\u00e9"],
    }
    chosen = [
        f"{k}={quote(rng.choice(v), safe='%')}" for k, v in params.items() if rng.random() < 0.5
    ]
    return ("?" + "&".join(chosen)) if chosen else ""


def conversation_id(rng: random.Random) -> str:
    return rng.choice(["c1", "nope", "%00", "%2F", "..", "a" * 300, "%E9", "\u00e9", "%ZZ"])


ROUTES: dict[str, Callable[[random.Random], bytes]] = {
    "POST /chat/chat": post("/chat/chat"),
    "POST /v1/chat/completions": post("/v1/chat/completions"),
    "POST /chat/feedback": post("/chat/feedback"),
    "GET /conversations": get(lambda rng: "/conversations" + query(rng)),
    "GET /conversations/{id}/messages": get(
        lambda rng: f"/conversations/{quote(conversation_id(rng), safe='%')}/messages" + query(rng)
    ),
    "DELETE /conversations/{id}": get(
        lambda rng: f"/conversations/{quote(conversation_id(rng), safe='%')}", "DELETE"
    ),
    "GET /health/*": get(lambda rng: rng.choice(["/health/live", "/health/ready"]) + query(rng)),
    "GET /models": get(lambda rng: rng.choice(["/models", "/v1/models"]) + query(rng)),
}


async def exchange(port: int, request: bytes) -> int:
    """Send one request; the status of its final answer (0: closed with none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(BOUND):
            status, length = 100, None
            while 100 <= status < 200:  # skip interim answers (100 Continue)
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/"):
                    return 0
                status, length = int(head.split(b" ", 2)[1]), content_length(head)
            # A body of known length is read to its end: not to the close, which may wait
            # while aiohttp discards the rest of a body the client said it would send.
            await (reader.read() if length is None else reader.readexactly(length))
        return status
    except asyncio.IncompleteReadError:
        return 0
    finally:
        writer.close()


def content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return None


def rows(chatbus: Chatbus) -> int:
    """Turns stored. (Deliveries are not counted: an accepted chat queues its own when it
    ends, after its answer, so their count moves under later requests.)"""
    with sqlite3.connect(chatbus.store.path) as db:  # type: ignore[attr-defined]
        return db.execute("SELECT count(*) FROM messages").fetchone()[0]


async def test_no_client_input_is_a_5xx_and_nothing_refused_is_stored(
    start_chatbus: StartChatbus,
    callback_secret: None,
) -> None:
    chatbus = await start_chatbus(
        server={"body_timeout_seconds": 0.2, "max_body_bytes": 64 * 1024},
        **webhook_settings(callback_hosts=["127.0.0.1:9", "[::1]:9"]),
    )
    port = urlsplit(chatbus.url).port
    assert port is not None
    await chatbus.store.add_message(
        MessageRecord(KNOWN_ID, "c1", "q", "echo", response="a", status=Status.COMPLETED)
    )
    rng = random.Random(SEED)
    counts: dict[str, Counter[int]] = {}
    stored_when_refused = []
    for route, make in ROUTES.items():
        counts[route] = Counter()
        for _ in range(PER_ROUTE):
            request = make(rng)
            before = rows(chatbus)
            status = await exchange(port, request)
            counts[route][status] += 1
            if status >= 400 and rows(chatbus) != before:
                stored_when_refused.append((status, request[:300]))
    print({route: dict(sorted(by_status.items())) for route, by_status in counts.items()})
    server_errors = {
        r: {s: n for s, n in c.items() if s >= 500 or s == 0} for r, c in counts.items()
    }
    assert all(not errors for errors in server_errors.values()), server_errors
    assert stored_when_refused == []
    for by_status in counts.values():  # the generator reaches past the guards, too
        assert sum(by_status.values()) == PER_ROUTE
        assert any(200 <= status < 300 for status in by_status)
