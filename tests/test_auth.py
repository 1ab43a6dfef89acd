"""API keys and tenants (core/auth.py): who may call, and that a tenant never reaches
another tenant's conversations or messages, even knowing their ids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog

from chatbus.testing.fake_upstream import FakeUpstream
from core.auth import check_exposure, digest
from core.config import AuthConfig, ConfigError
from core.config_sources import load_config
from tests.conftest import Chatbus, StartChatbus

ALICE_KEY = "cb-alice-0123456789abcdef"  # tenant "acme", configured by its digest
BOB_KEY = "cb-bob-fedcba9876543210"  # tenant "globex", configured by a variable


@pytest.fixture
async def secured(start_chatbus: StartChatbus, monkeypatch: pytest.MonkeyPatch) -> Chatbus:
    monkeypatch.setenv("BOB_KEY", BOB_KEY)
    return await start_chatbus(
        auth={
            "keys": {
                "alice": {"tenant": "acme", "sha256": digest(ALICE_KEY)},
                "bob": {"tenant": "globex", "key_env": "BOB_KEY"},
            }
        }
    )


def as_(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(
    chatbus: Chatbus, method: str, path: str, key: str | None, body: Any = None
) -> tuple[int, Any]:
    headers = as_(key) if key else {}
    async with chatbus.http.request(
        method, chatbus.url + path, json=body, headers=headers
    ) as response:
        return response.status, await response.json()


@pytest.mark.parametrize("key", [None, "wrong", f"{ALICE_KEY}x", ""])
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/chat/chat"), ("POST", "/chat/feedback"), ("GET", "/models"), ("GET", "/nope")],
)
async def test_a_missing_or_wrong_key_is_401(
    secured: Chatbus, key: str | None, method: str, path: str
) -> None:
    status, body = await call(secured, method, path, key, {"query": "hi"})
    assert status == 401
    assert body["error"]["type"] == "unauthorized"
    assert ALICE_KEY not in str(body)


async def test_a_scheme_other_than_bearer_is_refused(secured: Chatbus) -> None:
    headers = {"Authorization": f"Basic {ALICE_KEY}"}
    async with secured.http.post(
        secured.url + "/chat/chat", json={"query": "x"}, headers=headers
    ) as response:
        assert response.status == 401


async def test_health_needs_no_key(secured: Chatbus) -> None:
    assert (await call(secured, "GET", "/health/live", None))[0] == 200
    assert (await call(secured, "GET", "/health/ready", None))[0] == 200


async def test_each_key_chats_as_its_tenant(secured: Chatbus) -> None:
    for key, tenant in ((ALICE_KEY, "acme"), (BOB_KEY, "globex")):
        status, body = await call(secured, "POST", "/chat/chat", key, {"query": "mine"})
        assert (status, body["text"]) == (200, "mine")
        record = await secured.store.get_message(tenant, body["message_id"])
        assert record is not None and record.tenant == tenant
    events = await secured.events.wait_for("chat_completed", 2)
    assert {event.tenant for event in events} == {"acme", "globex"}


async def test_another_tenant_cannot_rate_a_message(secured: Chatbus) -> None:
    _, answer = await call(secured, "POST", "/chat/chat", ALICE_KEY, {"query": "secret"})
    feedback = {"message_id": answer["message_id"], "score": 0, "reason": "spite"}
    status, body = await call(secured, "POST", "/chat/feedback", BOB_KEY, feedback)
    assert status == 404  # not 403: the id does not leak
    assert body["error"]["type"] == "not_found"
    record = await secured.store.get_message("acme", answer["message_id"])
    assert record is not None and record.feedback_score == -1
    assert (await call(secured, "POST", "/chat/feedback", ALICE_KEY, feedback))[0] == 200


async def test_another_tenant_cannot_continue_a_conversation(
    secured: Chatbus, upstream: FakeUpstream
) -> None:
    first = {"query": "alice's private question", "conversation_id": "shared-id"}
    await call(secured, "POST", "/chat/chat", ALICE_KEY, first)
    later = {"query": "what did she ask?", "conversation_id": "shared-id", "history_len": 10,
             "model_name": "fake"}  # fmt: skip
    status, _ = await call(secured, "POST", "/chat/chat", BOB_KEY, later)
    assert status == 200
    assert upstream.received[-1].body["messages"] == [
        {"role": "user", "content": "what did she ask?"}
    ]  # none of alice's turns
    turns = await secured.store.recent_turns("acme", "shared-id", 10)
    assert [t.query for t in turns] == ["alice's private question"]  # hers, untouched


async def test_no_key_in_logs_or_error_bodies(secured: Chatbus) -> None:
    with structlog.testing.capture_logs() as logs:
        await call(secured, "POST", "/chat/chat", ALICE_KEY, {"query": "hi"})
        await call(secured, "POST", "/chat/chat", BOB_KEY, {"query": 5})
        await call(secured, "POST", "/chat/chat", f"{BOB_KEY}-wrong", {"query": "hi"})
    text = str(logs)
    assert ALICE_KEY not in text and BOB_KEY not in text


def test_listening_beyond_loopback_needs_keys_or_a_decision() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, AuthConfig())
    with pytest.raises(ConfigError, match=r"^server\.host: refusing to listen on 0\.0\.0\.0"):
        check_exposure("0.0.0.0", AuthConfig())
    check_exposure("0.0.0.0", AuthConfig(allow_public_without_keys=True))
    check_exposure("0.0.0.0", AuthConfig.model_validate({"keys": {"k": {
        "tenant": "t", "sha256": digest("k")}}}))  # fmt: skip


def test_serve_refuses_the_world_without_keys(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "core.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("chatbus: configuration error: ")
    assert "refusing to listen on 0.0.0.0 without [auth] keys" in line


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('tenant = "t"', "auth.keys.k: give the key's sha256 or its key_env, one of them"),
        ('tenant = "t"\nsha256 = "abc"', "auth.keys.k.sha256: String should match pattern"),
    ],
)
def test_bad_keys_are_config_errors(tmp_path: Path, table: str, problem: str) -> None:
    file = tmp_path / "c.toml"
    file.write_text(f"[auth.keys.k]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, {})
    assert str(info.value).startswith(f"{file}: {problem}")


async def test_a_key_variable_that_is_not_set_stops_start_up(start_chatbus: StartChatbus) -> None:
    key = {"tenant": "t", "key_env": "CHATBUS_TEST_UNSET_KEY"}
    with pytest.raises(ConfigError, match=r"^auth\.keys\.k\.key_env: CHATBUS_TEST_UNSET_KEY is"):
        await start_chatbus(auth={"keys": {"k": key}})
