"""HTTP plumbing shared by every route: request ids, JSON errors, validated bodies."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from core.errors import (
    CallbackNotAllowed,
    ChatError,
    MessageNotFound,
    StoreUnavailable,
    UnknownModel,
    UnknownPrompt,
)
from core.ids import new_id
from core.logs import log_context
from core.validation import problem_of

log = structlog.get_logger("chatbus.web")
M = TypeVar("M", bound=BaseModel)
REQUEST_ID = web.RequestKey("request_id", str)
TENANT = web.RequestKey("tenant", str)  # set by core/auth.py
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # the requests whose body is read
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class ApiError(Exception):
    """An error the client caused or must know about, answered as JSON."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        cause: Exception | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field
        self.headers = headers
        self.cause = cause  # the domain error it answers, if one
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """chatbus's `error` object, beside chatchat's `code` (the HTTP status) and `msg`,
        which chatchat's webui reads (`check_error_msg`)."""
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error, "code": self.status, "msg": self.message, **self.extra}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    message: str
    field: str | None = None  # the request's field at fault, when one is


class ErrorBody(BaseModel):
    """chatbus's error (`ApiError.body`)."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail
    code: int  # the HTTP status
    msg: str  # the message again, where chatchat's webui reads it


# How an error is answered: chatbus's own shape, unless a transport with a wire format of its
# own claimed the path's prefix (`answer_errors_as`), so that its clients read every error,
# the ones raised before its handler runs (a missing API key, an unknown path) included.
ErrorShape = Callable[[ApiError], web.Response]
ERROR_SHAPES = web.AppKey("error_shapes", dict[str, ErrorShape])
# The model of each shape's body, for /openapi.json (None: not described).
ERROR_SCHEMAS = web.AppKey("error_schemas", dict[str, type[BaseModel] | None])


def answer_errors_as(
    app: web.Application, prefix: str, shape: ErrorShape, schema: type[BaseModel] | None = None
) -> None:
    """Answer the errors of every path under `prefix` (e.g. "/v1/") with `shape`, whose
    bodies `schema` describes in /openapi.json."""
    app.setdefault(ERROR_SHAPES, {})[prefix] = shape
    app.setdefault(ERROR_SCHEMAS, {})[prefix] = schema


def error_schema_for(app: web.Application, path: str) -> type[BaseModel] | None:
    """The model of the error bodies answered under `path`."""
    for prefix, schema in app.get(ERROR_SCHEMAS, {}).items():
        if path.startswith(prefix):
            return schema
    return ErrorBody


def chatbus_error(error: ApiError) -> web.Response:
    return json_response(error.body(), error.status, error.headers)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def request_context(access_log: bool) -> Any:
    """Give every request an id (the caller's X-Request-Id when sane), bound to its log
    lines; answer errors as JSON; log one line per request when `access_log` is on."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id", "")
        request_id = given if _SAFE_REQUEST_ID.match(given) else new_id()
        request[REQUEST_ID] = request_id
        started = time.perf_counter()
        status = 499  # unless an answer is made: the client left first
        with log_context(request_id=request_id):
            try:
                response = await _answer(request, handler, request_id)
                status = response.status
                return response
            finally:
                if access_log:
                    elapsed = round((time.perf_counter() - started) * 1000, 2)
                    log.info(
                        "request",
                        method=request.method,
                        path=request.path,
                        status=status,
                        ms=elapsed,
                        tenant=request.get(TENANT),
                    )

    return middleware


# The HTTP status of each of the chat service's errors (core/errors.py), chatbus's own wire;
# a transport's error shape (`answer_errors_as`) may answer one otherwise (`ApiError.cause`).
STATUS_OF: dict[type[ChatError], int] = {
    UnknownModel: 400,
    UnknownPrompt: 400,
    CallbackNotAllowed: 400,
    MessageNotFound: 404,
}


def api_error(exc: ChatError | StoreUnavailable) -> ApiError:
    """A domain error as the answer to a request."""
    if isinstance(exc, StoreUnavailable):
        message = f"the history store is unavailable ({exc}); try again"
        return ApiError(503, "store_unavailable", message, cause=exc)
    status = next((s for kind, s in STATUS_OF.items() if isinstance(exc, kind)), 400)
    return ApiError(status, exc.type, exc.message, field=exc.field, cause=exc)


async def _answer(request: web.Request, handler: Any, request_id: str) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        error = exc
    except (ChatError, StoreUnavailable) as exc:
        error = api_error(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = exc.reason.lower().replace(" ", "_")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        error = ApiError(exc.status, kind, exc.reason, headers=allow)
    except Exception:
        log.exception("unhandled error", path=request.path)
        error = ApiError(500, "internal_error", f"internal error; request id {request_id}")
    return _shape_for(request)(error)


def _shape_for(request: web.Request) -> ErrorShape:
    for prefix, shape in request.app.get(ERROR_SHAPES, {}).items():
        if request.path.startswith(prefix):
            return shape
    return chatbus_error


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every response, streamed ones too, names its request id."""
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]


async def read_body(request: web.Request, schema: type[M], **context: Any) -> M:
    """Parse and validate a JSON body; any problem is a 4xx naming the field."""
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw.strip() else {}  # no body: every field's default
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "validation_error", "the body must be a JSON object")
    try:
        return schema.model_validate(data, context=context)
    except ValidationError as exc:
        problem = problem_of(exc)
        raise ApiError(422, "validation_error", str(problem), field=problem.field) from None
