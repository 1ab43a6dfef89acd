"""CORS (core/cors.py): off by default; for `[server] cors_origins`, preflights answered
before the key check and every answer, streamed ones too, readable by the page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.auth import digest
from core.config import ConfigError
from core.config_sources import load_config
from tests.conftest import Chatbus, StartChatbus

APP = "https://app.example"
KEY = "cb-cors-0123456789abcdef"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def cors(*origins: str, keys: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {"server": {"cors_origins": list(origins)}}
    if keys:
        config["auth"] = {"keys": {"app": {"tenant": "t", "sha256": digest(KEY)}}}
    return config


async def preflight(chatbus: Chatbus, headers: dict[str, str]) -> Any:
    async with chatbus.http.options(f"{chatbus.url}/chat/chat", headers=headers) as response:
        return response.status, response.headers, await response.read()


async def test_off_by_default(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus()
    status, headers, _ = await preflight(chatbus, PREFLIGHT)
    assert status != 204 and "Access-Control-Allow-Origin" not in headers
    async with chatbus.http.get(f"{chatbus.url}/health/live", headers={"Origin": APP}) as r:
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_a_preflight_is_answered_before_the_key_check(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(**cors(APP, keys=True))
    status, headers, body = await preflight(chatbus, PREFLIGHT)  # no key, as browsers send it
    assert status == 204 and body == b""
    assert headers["Access-Control-Allow-Origin"] == APP
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert headers["Vary"] == "Origin"


async def test_a_streamed_answer_and_an_error_carry_the_headers(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(**cors(APP, keys=True))
    headers = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
    body = {"query": "hello there", "stream": True}
    async with chatbus.http.post(f"{chatbus.url}/chat/chat", json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == APP
        assert r.headers["Access-Control-Expose-Headers"] == "X-Request-Id"
        assert b"there" in await r.read()
    async with chatbus.http.post(  # no key: the page can read why
        f"{chatbus.url}/chat/chat", json=body, headers={"Origin": APP}
    ) as r:
        assert r.status == 401
        assert r.headers["Access-Control-Allow-Origin"] == APP


async def test_another_origin_gets_nothing(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(**cors(APP))
    other = {**PREFLIGHT, "Origin": "https://evil.example"}
    status, headers, body = await preflight(chatbus, other)
    assert status == 403 and b"cors_origins" in body
    assert "Access-Control-Allow-Origin" not in headers
    async with chatbus.http.get(
        f"{chatbus.url}/health/live", headers={"Origin": "https://evil.example"}
    ) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_any_origin_never_with_credentials(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(**cors("*"))
    status, headers, _ = await preflight(chatbus, PREFLIGHT)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers


@pytest.mark.parametrize("origin", ["app.example", "https://app.example/path", "ftp://x"])
def test_an_entry_that_is_no_origin_is_refused(tmp_path: Path, origin: str) -> None:
    file = tmp_path / "c.toml"
    file.write_text(f'[server]\ncors_origins = ["{origin}"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(file, {})
    assert str(info.value).startswith(f"{file}: server.cors_origins: ")
    assert "is not an origin (scheme://host[:port]) or *" in str(info.value)
