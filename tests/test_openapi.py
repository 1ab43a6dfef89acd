"""/openapi.json (core/openapi.py) and /docs (plugins/transports/docs): the document covers
every route the running app has, a plugin's too, is OpenAPI 3.1 in structure, says what the
routes really answer; the docs page loads only from chatbus; neither needs an API key."""

from __future__ import annotations

import re
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel, Field

from core.auth import digest
from core.hookspecs import hookimpl
from core.openapi import Content, ResponseModel, operation, operation_of
from core.web import error_schema_for, json_response, read_body
from plugins.transports import docs
from tests.conftest import Chatbus, StartChatbus

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
KEY = "cb-docs-0123456789abcdef"


async def openapi_of(chatbus: Chatbus) -> dict[str, Any]:
    async with chatbus.http.get(chatbus.url + "/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document: dict[str, Any] = await response.json()
        return document


def refs_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [ref for item in value.values() for ref in refs_in(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in refs_in(item)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    found: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(found, dict) and part in found, f"{ref} does not resolve"
        found = found[part]
    return found


def app_routes(chatbus: Chatbus) -> list[tuple[str, str]]:
    return sorted(
        (route.resource.canonical, route.method.lower())
        for route in chatbus.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    )


async def test_the_document_is_openapi_3_1_in_structure(chatbus: Chatbus) -> None:
    document = await openapi_of(chatbus)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "chatbus" and document["info"]["version"]
    assert document["paths"]
    for path, item in document["paths"].items():
        assert path.startswith("/")
        assert item and set(item) <= METHODS, path
        for method, op in item.items():
            assert op["summary"] and op["responses"], (method, path)
            assert all(re.fullmatch(r"[1-5][0-9][0-9]", status) for status in op["responses"])
            assert all(answer["description"] for answer in op["responses"].values())
    refs = refs_in(document)
    assert len(refs) > 20
    for ref in refs:
        resolve(document, ref)
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert scheme == {"type": "http", "scheme": "bearer", "description": scheme["description"]}
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


async def test_every_route_of_the_running_app_is_documented(chatbus: Chatbus) -> None:
    document = await openapi_of(chatbus)
    listed = sorted((path, method) for path, item in document["paths"].items() for method in item)
    assert listed == app_routes(chatbus)
    assert {"/chat/chat", "/v1/chat/completions", "/conversations", "/metrics"} <= set(
        document["paths"]
    )
    undescribed = [
        route.resource.canonical
        for route in chatbus.app.router.routes()
        if route.resource is not None and operation_of(route.handler) is None
    ]
    assert undescribed == []  # every built-in route says what it answers


async def test_request_bodies_successes_and_errors_are_described(chatbus: Chatbus) -> None:
    document = await openapi_of(chatbus)
    paths = document["paths"]
    chat = paths["/chat/chat"]["post"]
    body = resolve(document, chat["requestBody"]["content"]["application/json"]["schema"]["$ref"])
    assert chat["requestBody"]["required"] is True and "query" in body["required"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"202", "401", "413", "415", "422", "502"} <= set(chat["responses"])
    completions = paths["/v1/chat/completions"]["post"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    messages = paths["/conversations/{conversation_id}/messages"]["get"]
    names = {(p["name"], p["in"]) for p in messages["parameters"]}
    assert names == {("conversation_id", "path"), ("limit", "query"), ("offset", "query")}
    listing = paths["/conversations"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"limit", "offset", "cursor"}
    assert "400" in listing["responses"]
    page = resolve(
        document, listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    )
    assert "next_cursor" in page["properties"]
    # A body with every field defaulted may be left out (read_body: no body is {}).
    assert paths["/llm_model/list_config_models"]["post"]["requestBody"]["required"] is False


def error_schema(op: dict[str, Any], status: str) -> str:
    ref: str = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1]


async def test_errors_have_the_shape_of_their_paths(chatbus: Chatbus) -> None:
    paths = (await openapi_of(chatbus))["paths"]
    assert error_schema(paths["/v1/chat/completions"]["post"], "400") == "OpenAIError"
    assert error_schema(paths["/v1/models"]["get"], "401") == "OpenAIError"
    assert error_schema(paths["/chat/chat"]["post"], "422") == "ErrorBody"
    assert error_schema(paths["/conversations/{conversation_id}"]["delete"], "404") == "ErrorBody"
    for path in ("/health/live", "/health/ready", "/openapi.json", "/docs"):
        assert paths[path]["get"]["security"] == []
        assert "401" not in paths[path]["get"]["responses"]


class Greeting(BaseModel):
    name: str = Field(min_length=1)
    shout: bool = False


class Greeted(ResponseModel):
    """The greeting."""

    text: str


class GreetingPlugin:
    """A plugin's routes: one described, one not."""

    @hookimpl
    def register_routes(self, app: web.Application, router: web.UrlDispatcher) -> None:
        @operation("Greet", request=Greeting, responses={200: Greeted}, errors={422: "bad"})
        async def greet(request: web.Request) -> web.Response:
            body = await read_body(request, Greeting)
            return json_response({"text": f"hello {body.name}"})

        async def wave(request: web.Request) -> web.Response:
            """Wave back."""
            return json_response({})

        router.add_post("/greet", greet)
        router.add_get("/greet/{who}/wave", wave)


async def test_a_plugins_routes_appear_with_their_models(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(GreetingPlugin())
    document = await openapi_of(chatbus)
    greet = document["paths"]["/greet"]["post"]
    schema = greet["requestBody"]["content"]["application/json"]["schema"]
    assert resolve(document, schema["$ref"])["properties"]["name"]["minLength"] == 1
    ok = greet["responses"]["200"]
    assert ok["description"] == "The greeting."
    assert resolve(document, ok["content"]["application/json"]["schema"]["$ref"])["required"] == [
        "text"
    ]
    assert error_schema(greet, "422") == "ErrorBody"
    wave = document["paths"]["/greet/{who}/wave"]["get"]
    assert wave["summary"] == "Wave back."
    assert wave["parameters"] == [
        {"name": "who", "in": "path", "required": True, "schema": {"type": "string"}}
    ]


def documented_model(chatbus: Chatbus, method: str, path: str, status: int) -> type[BaseModel]:
    """The model /openapi.json names for `status` of the route `method path`."""
    route = next(
        r
        for r in chatbus.app.router.routes()
        if r.method == method and r.resource is not None and r.resource.canonical == path
    )
    described = operation_of(route.handler)
    assert described is not None
    answer = described.responses.get(status) or described.errors[status]
    for body in answer if isinstance(answer, tuple) else (answer,):
        if isinstance(body, str):
            found = error_schema_for(chatbus.app, path)
            assert found is not None
            return found
        if not isinstance(body, Content):
            return body
    raise AssertionError(f"{method} {path} {status}: no JSON model")


@pytest.mark.both_stores
async def test_real_answers_match_their_documented_models(chatbus: Chatbus) -> None:
    status, answer = await chatbus.chat_json(query="hi", conversation_id="c1")
    assert status == 200
    message_id = answer["message_id"]
    calls: list[tuple[str, str, str, dict[str, Any] | None]] = [
        ("GET", "/models", "/models", None),
        ("GET", "/health/live", "/health/live", None),
        ("GET", "/health/ready", "/health/ready", None),
        ("GET", "/conversations", "/conversations", None),
        ("GET", "/conversations/c1/messages", "/conversations/{conversation_id}/messages", None),
        ("GET", "/conversations/nope/messages", "/conversations/{conversation_id}/messages", None),
        ("GET", "/conversations?limit=0", "/conversations", None),
        ("POST", "/chat/chat", "/chat/chat", {"query": "again", "conversation_id": "c1"}),
        ("POST", "/chat/chat", "/chat/chat", {"query": "x", "model_name": "nope"}),
        ("POST", "/chat/feedback", "/chat/feedback", {"message_id": message_id, "score": 90}),
        ("POST", "/server/configs", "/server/configs", {}),
        ("POST", "/llm_model/list_running_models", "/llm_model/list_running_models", {}),
        ("POST", "/server/get_prompt_template", "/server/get_prompt_template", {}),
        ("GET", "/v1/models", "/v1/models", None),
        (
            "POST",
            "/v1/chat/completions",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
        ),
        ("POST", "/v1/chat/completions", "/v1/chat/completions", {"messages": []}),
        ("DELETE", "/conversations/c1", "/conversations/{conversation_id}", None),
    ]
    statuses = []
    for method, url, path, body in calls:
        async with chatbus.http.request(method, chatbus.url + url, json=body) as response:
            data = await response.json()
        statuses.append(response.status)
        documented_model(chatbus, method, path, response.status).model_validate(data)
    assert statuses == [200] * 5 + [404, 422, 200, 400] + [200] * 6 + [400, 200]


async def test_the_docs_page_loads_only_from_chatbus(chatbus: Chatbus) -> None:
    async with chatbus.http.get(chatbus.url + "/docs") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
        policy = response.headers["Content-Security-Policy"]
    assert f'<script src="{docs.SCRIPT_PATH}"></script>' in page
    assert 'spec-url="/openapi.json"' in page
    assert not re.search(r"https?://|//[a-z]", page, re.I)  # no other host, no fonts
    assert "default-src 'self'" in policy and "img-src 'self' data:" in policy
    async with chatbus.http.get(chatbus.url + docs.SCRIPT_PATH) as response:
        assert response.status == 200
        assert response.content_type == "application/javascript"
        script = await response.read()
    assert script == docs.redoc_bundle() and len(script) > 500_000


async def test_the_docs_are_get_only(chatbus: Chatbus) -> None:
    for path in ("/openapi.json", "/docs"):
        async with chatbus.http.post(chatbus.url + path, json={}) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET,HEAD"


async def test_the_docs_need_no_key_when_keys_are_configured(
    start_chatbus: StartChatbus,
) -> None:
    chatbus = await start_chatbus(auth={"keys": {"a": {"tenant": "t", "sha256": digest(KEY)}}})
    for path in ("/openapi.json", "/docs", docs.SCRIPT_PATH, "/health/live"):
        async with chatbus.http.get(chatbus.url + path) as response:
            assert response.status == 200, path
    async with chatbus.http.get(chatbus.url + "/models") as response:
        assert response.status == 401  # the rest still needs one
    headers = {"Authorization": f"Bearer {KEY}"}
    async with chatbus.http.get(chatbus.url + "/models", headers=headers) as response:
        assert response.status == 200


def test_redoc_is_vendored_pinned_and_shipped() -> None:
    static = files("plugins.transports.docs") / "static"
    script = (static / "redoc.standalone.js").read_bytes()
    assert script.startswith(b"/*! For license information")
    assert "MIT License" in (static / "redoc.LICENSE").read_text()
    assert docs.REDOC_VERSION in (static / "README.md").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["plugins.transports.docs"]
    assert "static/*" in shipped
