"""OpenAPI 3.1: what a route says about itself (`@operation` on its handler), and the
document built from the routes an app really has, every plugin's included, with the JSON
schemas of their pydantic models. The models are read when the document is built, so it
follows them as they change.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from core.web import BODY_METHODS, error_schema_for

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
SECURITY_SCHEME = "apiKey"
_ATTRIBUTE = "__chatbus_operation__"
_PATH_PARAMETER = re.compile(r"{(\w+)}")
# What core/guards.py answers any request with a body, before its route runs.
BODY_ERRORS = {
    413: "The body is larger than `[server] max_body_bytes`.",
    415: "A body that is not sent as `Content-Type: application/json`.",
}

Handler = TypeVar("Handler", bound=Callable[..., Any])


class ResponseModel(BaseModel):
    """The documented shape of a JSON answer a handler builds as a plain dict. Fields it
    does not name are refused, so that a test validating real answers sees any drift."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Content:
    """An answer that is not a JSON model: an event stream, a page, a script."""

    media_type: str
    description: str


Body = type[BaseModel] | Content


@dataclass(frozen=True)
class Operation:
    summary: str
    responses: Mapping[int, Body | tuple[Body, ...]]
    request: type[BaseModel] | None = None
    # status -> when it is answered (in the path's error shape), or a model of its own
    errors: Mapping[int, str | type[BaseModel]] = field(default_factory=dict)
    query: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # name -> JSON schema
    tags: tuple[str, ...] = ()
    public: bool = False  # answered without an API key


def operation(
    summary: str,
    *,
    responses: Mapping[int, Body | tuple[Body, ...]],
    request: type[BaseModel] | None = None,
    errors: Mapping[int, str | type[BaseModel]] | None = None,
    query: Mapping[str, dict[str, Any]] | None = None,
    tags: Iterable[str] = (),
    public: bool = False,
) -> Callable[[Handler], Handler]:
    """Describe a route's handler for /openapi.json. `public=True`: no API key is asked
    for (core/auth.py reads it)."""
    described = Operation(
        summary, responses, request, errors or {}, query or {}, tuple(tags), public
    )

    def mark(handler: Handler) -> Handler:
        setattr(handler, _ATTRIBUTE, described)
        return handler

    return mark


def operation_of(handler: Callable[..., Any]) -> Operation | None:
    found = getattr(handler, _ATTRIBUTE, None)  # a bound method reads its function's
    return found if isinstance(found, Operation) else None


def is_public(handler: Callable[..., Any]) -> bool:
    described = operation_of(handler)
    return described is not None and described.public


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of `app`'s routes (call it once the app is started)."""
    routes = [
        (route.resource.canonical, route, operation_of(route.handler) or _undocumented(route))
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None  # HEAD: GET's twin
    ]
    schemas = _Schemas(app, [op for _, _, op in routes], [path for path, _, _ in routes])
    paths: dict[str, dict[str, Any]] = {}
    for path, route, described in routes:
        paths.setdefault(path, {})[route.method.lower()] = _operation_object(
            route, path, described, schemas
        )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "chatbus", "version": version("chatbus")},
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key of `[auth] keys`, needed when any is configured.",
                }
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }


def _undocumented(route: web.AbstractRoute) -> Operation:
    """A route whose handler has no `@operation` (a plugin's) is listed all the same."""
    summary = (inspect.getdoc(route.handler) or "").split("\n", 1)[0]
    return Operation(summary or "(undocumented)", {200: Content("application/json", "OK")})


class _Schemas:
    """Every model the operations name, as JSON schemas under `#/components/schemas`."""

    def __init__(self, app: web.Application, ops: list[Operation], paths: list[str]) -> None:
        self.error_models = {path: error_schema_for(app, path) for path in paths}
        wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
        for described in ops:
            if described.request is not None:
                wanted[(described.request, "validation")] = None
            for model in _models(described):
                wanted[(model, "serialization")] = None
        for error_model in self.error_models.values():
            if error_model is not None:
                wanted[(error_model, "serialization")] = None
        refs, definitions = models_json_schema(list(wanted), ref_template=REF_TEMPLATE)
        self._refs = {model: ref for (model, _), ref in refs.items()}
        self.components = definitions.get("$defs", {})

    def ref(self, model: type[BaseModel]) -> dict[str, Any]:
        return dict(self._refs[model])


def _models(described: Operation) -> list[type[BaseModel]]:
    bodies = [body for value in described.responses.values() for body in _bodies(value)]
    found = [body for body in bodies if not isinstance(body, Content)]
    return found + [error for error in described.errors.values() if not isinstance(error, str)]


def _bodies(value: Body | tuple[Body, ...]) -> tuple[Body, ...]:
    return value if isinstance(value, tuple) else (value,)


def _operation_object(
    route: web.AbstractRoute, path: str, described: Operation, schemas: _Schemas
) -> dict[str, Any]:
    method = route.method.lower()
    found: dict[str, Any] = {
        "operationId": method + re.sub(r"\W+", "_", path).rstrip("_"),
        "summary": described.summary,
    }
    doc = inspect.getdoc(route.handler)
    if doc:
        found["description"] = doc
    if described.tags:
        found["tags"] = list(described.tags)
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAMETER.findall(path)
    ] + [
        {"name": name, "in": "query", "schema": schema} for name, schema in described.query.items()
    ]
    if parameters:
        found["parameters"] = parameters
    if described.request is not None:
        found["requestBody"] = _request_body(described.request, schemas)
    found["responses"] = _responses(path, method, described, schemas)
    if described.public:
        found["security"] = []
    return found


def _request_body(model: type[BaseModel], schemas: _Schemas) -> dict[str, Any]:
    # No body at all is every field's default (core/web.py's read_body).
    required = any(info.is_required() for info in model.model_fields.values())
    return {"required": required, "content": {"application/json": {"schema": schemas.ref(model)}}}


def _responses(path: str, method: str, described: Operation, schemas: _Schemas) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for status, value in described.responses.items():
        bodies = _bodies(value)
        found[str(status)] = {
            "description": " Or: ".join(_description(body) for body in bodies),
            "content": {_media_type(body): _media(body, schemas) for body in bodies},
        }
    errors: dict[int, str | type[BaseModel]] = dict(described.errors)
    if not described.public:
        errors.setdefault(401, "A valid API key is needed (when keys are configured).")
    if method.upper() in BODY_METHODS:
        errors = {**BODY_ERRORS, **errors}
    for status, error in sorted(errors.items()):
        model = schemas.error_models[path] if isinstance(error, str) else error
        description = error if isinstance(error, str) else _description(error)
        found[str(status)] = {"description": description}
        if model is not None:
            found[str(status)]["content"] = {"application/json": {"schema": schemas.ref(model)}}
    return found


def _description(body: Body) -> str:
    if isinstance(body, Content):
        return body.description
    # The class's own docstring: inspect.getdoc would inherit ResponseModel's.
    doc = inspect.cleandoc(body.__doc__) if body.__doc__ else body.__name__
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def _media_type(body: Body) -> str:
    return body.media_type if isinstance(body, Content) else "application/json"


def _media(body: Body, schemas: _Schemas) -> dict[str, Any]:
    if isinstance(body, Content):
        return {"schema": {"type": "string"}}
    return {"schema": schemas.ref(body)}
