"""OpenAI's Chat Completions wire format: `POST /v1/chat/completions` and `GET /v1/models`,
so every OpenAI SDK is a chatbus client. The same chat service runs underneath (history,
events, webhooks); chatbus's own fields ride as extra body fields.

The last message is the query; the ones before it are the history, used as is. When none
of them is a user's or an assistant's (system messages are instructions), `conversation_id`
and `history_len` read stored turns after them, as on `/chat/chat`; with no `history_len`,
`[chat] default_history_len` turns (chatchat's -1 is /chat/chat's alone).
Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, where `code`
is chatbus's error type.
"""

from __future__ import annotations

from aiohttp import web

from core.errors import UnknownModel
from core.hookspecs import hookimpl
from core.web import ApiError, answer_errors_as
from plugins.transports.openai.chat import chat_completions, get_model, list_models
from plugins.transports.openai.responses import OpenAIError, error_response


@hookimpl
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_get("/v1/models", list_models)
    router.add_get("/v1/models/{id}", get_model)
    answer_errors_as(app, "/v1/", openai_error, OpenAIError)


def openai_error(error: ApiError) -> web.Response:
    """Every error under /v1/ before a response began, in OpenAI's shape: a missing key's 401
    and an unknown path's 404 too."""
    if isinstance(error.cause, UnknownModel):  # OpenAI answers an unknown model with a 404
        known = ", ".join(error.cause.known)
        message = f"model: the model '{error.cause.name}' does not exist (configured: {known})"
        return error_response(404, "model_not_found", message, "model")
    status = 400 if error.status == 422 else error.status  # OpenAI: every bad input is 400
    return error_response(status, error.type, error.message, error.field, error.headers)
