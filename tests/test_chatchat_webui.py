"""The endpoints chatchat's webui calls on load (plugins/transports/chatchat/webui.py),
answered in chatchat's shape, read the way its `ApiRequest` reads them, and never with a
secret in them."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from core.hookspecs import hookimpl
from plugins.providers.echo import EchoOptions, EchoProvider
from tests.chatchat_client import LLM_MODELS, check_error_msg
from tests.conftest import Chatbus, StartChatbus

SECRETS = ("sekrit-env-key", "sekrit-pass", "sekrit-aws", "sekrit-token", "sekrit-bearer")
API_KEY = "sekrit-bearer-api-key"


class VaultProvider:
    """A third-party provider kind whose options hold what must never be shown."""

    @hookimpl
    def register_providers(self, register: Any) -> None:
        register("vault", lambda spec, http: EchoProvider(EchoOptions()))


def secret_models(upstream_url: str) -> dict[str, Any]:
    return {
        "echo": {"provider": "echo"},
        "local": {
            "provider": "openai_compat",
            "base_url": upstream_url.replace("http://", "http://user:sekrit-pass@"),
            "model": "fake-model",
            "api_key_env": "CHATBUS_TEST_SEKRIT",
            "extra_body": {"session_token": "sekrit-token", "top_p": 0.9},
        },
        "cloud": {
            "provider": "vault",
            "aws_secret_access_key": "sekrit-aws",
            "client_id": "sekrit-aws-id",
            "headers": {"X-Custom": "sekrit-token"},
            "region": "eu-west-1",
            "fallbacks": ["echo"],
        },
    }


@pytest.fixture
async def webui(
    start_chatbus: StartChatbus, upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> Chatbus:
    monkeypatch.setenv("CHATBUS_TEST_SEKRIT", "sekrit-env-key")
    monkeypatch.setenv("CHATBUS_TEST_API_KEY", API_KEY)
    auth = {"keys": {"k": {"tenant": "t", "key_env": "CHATBUS_TEST_API_KEY"}}}
    return await start_chatbus(
        VaultProvider(), models=secret_models(upstream.base_url), default_model="local", auth=auth
    )


async def post(chatbus: Chatbus, path: str, body: Any = None) -> httpx.Response:
    """As `ApiRequest.post`: JSON when there is a body, nothing at all otherwise."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        if body is None:
            return await client.post(chatbus.url + path)
        return await client.post(chatbus.url + path, json=body)


async def test_running_models_the_default_first(webui: Chatbus) -> None:
    answer = await post(webui, "/llm_model/list_running_models", {"controller_address": None})
    body = answer.json()
    assert (answer.status_code, body["code"], body["msg"]) == (200, 200, "success")
    running = body["data"]
    assert list(running) == ["local", "cloud", "echo", "fake"]  # fake: the fixture's
    assert running["local"]["provider"] == "openai_compat"
    assert running["local"]["online_api"] is False
    assert running["cloud"]["online_api"] is True
    assert running["cloud"]["region"] == "eu-west-1"
    assert running["cloud"]["fallbacks"] == ["echo"]
    assert running["local"]["extra_body"] == {"top_p": 0.9}
    assert running["local"]["base_url"].startswith("http://127.0.0.1:")
    # ApiRequest.get_default_llm_model: none of chatchat's LLM_MODELS runs here, so the
    # webui takes the first running model, and reads online_api of it.
    model = next((m for m in LLM_MODELS if m in running), next(iter(running)))
    assert (model, not running[model].get("online_api")) == ("local", True)


@pytest.mark.parametrize(
    ("types", "kinds"),
    [
        (None, {"local": ["local", "echo", "fake"], "online": ["cloud"]}),
        (["online"], {"online": ["cloud"]}),
        (["local", "worker"], {"local": ["local", "echo", "fake"]}),
    ],
)
async def test_config_models_by_type(
    webui: Chatbus, types: list[str] | None, kinds: dict[str, list[str]]
) -> None:
    body = {} if types is None else {"types": types}
    answer = (await post(webui, "/llm_model/list_config_models", body)).json()
    assert answer["code"] == 200
    assert {kind: list(models) for kind, models in answer["data"].items()} == kinds


async def test_one_models_config(webui: Chatbus) -> None:
    answer = (await post(webui, "/llm_model/get_model_config", {"model_name": "cloud"})).json()
    assert answer["code"] == 200
    assert answer["data"]["provider"] == "vault"
    missing = await post(webui, "/llm_model/get_model_config", {"model_name": "chatglm3-6b"})
    body = missing.json()
    assert (missing.status_code, body["code"]) == (404, 404)
    assert "chatglm3-6b" in check_error_msg(body)
    assert body.get("data", {}) == {}  # what the webui's `r.get("data", {})` makes of it


@pytest.mark.parametrize("path", ["/llm_model/change", "/llm_model/stop"])
async def test_switching_models_is_not_chatbus_s_job(webui: Chatbus, path: str) -> None:
    answer = await post(webui, path, {"model_name": "local", "new_model_name": "echo"})
    body = answer.json()
    assert (answer.status_code, body["code"]) == (501, 501)
    assert "restart" in check_error_msg(body)


async def test_server_configs_without_a_body(webui: Chatbus) -> None:
    answer = await post(webui, "/server/configs")  # the webui POSTs it with no body at all
    body = answer.json()
    assert (answer.status_code, body["code"]) == (200, 200)
    assert body["LLM_MODELS"] == ["local", "cloud", "echo", "fake"]
    assert body["PROMPT_TEMPLATES"]["llm_chat"]["py"] == "Code: {{ input }}"
    assert body["TEMPERATURE"] == 0.7
    search = (await post(webui, "/server/list_search_engines")).json()
    assert (search["code"], search["data"]) == (200, [])


async def test_prompt_templates(webui: Chatbus) -> None:
    answer = await post(webui, "/server/get_prompt_template", {"type": "llm_chat", "name": "py"})
    assert answer.status_code == 200
    assert answer.json() == "Code: {{ input }}"  # a JSON string, as chatchat's server answers
    default = await post(webui, "/server/get_prompt_template", {})
    assert default.json() == "{{ input }}"
    for body in ({"name": "nope"}, {"type": "knowledge_base_chat", "name": "default"}):
        missing = await post(webui, "/server/get_prompt_template", body)
        assert (missing.status_code, missing.json()["code"]) == (404, 404)


async def test_no_secret_in_any_body(webui: Chatbus) -> None:
    calls: list[tuple[str, Any]] = [
        ("/llm_model/list_running_models", {"controller_address": None}),
        ("/llm_model/list_config_models", {"types": ["local", "online", "worker"]}),
        ("/llm_model/get_model_config", {"model_name": "local"}),
        ("/llm_model/get_model_config", {"model_name": "cloud"}),
        ("/llm_model/get_model_config", {"model_name": "nope"}),
        ("/llm_model/change", {"model_name": "local", "new_model_name": "cloud"}),
        ("/llm_model/stop", {"model_name": "local"}),
        ("/server/configs", None),
        ("/server/list_search_engines", None),
        ("/server/get_prompt_template", {"name": "default"}),
    ]
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    for path, body in calls:
        text = (await post(webui, path, body)).text
        assert text.startswith(("{", '"')), path
        for secret in (*SECRETS, digest, "CHATBUS_TEST_SEKRIT", "user:"):
            assert secret not in text, (path, secret)


async def test_a_key_is_still_required(webui: Chatbus) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        answer = await client.post(webui.url + "/llm_model/list_running_models", json={})
    assert (answer.status_code, answer.json()["code"]) == (401, 401)
