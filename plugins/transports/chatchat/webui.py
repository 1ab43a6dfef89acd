"""The endpoints chatchat's webui calls besides `/chat/chat`, answered from chatbus's own
configuration in chatchat's shape, `{"code": 200, "msg": "success", "data": ...}`.

Which configured models are "local" and which "online" (`/llm_model/list_config_models`,
and each model's `online_api`) goes by the provider kind: `echo` and `openai_compat` (a
server you run: vLLM, Ollama, llama.cpp, FastChat) are local, `litellm` and any other kind
are online. Every configured model is "running": chatbus loads none itself, so switching
or stopping one (`/llm_model/change`, `/llm_model/stop`) answers 501.

A model's configuration is shown without anything that could be a secret: chatchat's own
rule (no key containing "key" or "secret", or ending in "id") and more (tokens, passwords,
headers, `*_env` names), and URLs lose their user and password.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import Field, RootModel
from yarl import URL

from core.config import Config, ModelConfig
from core.keys import CONFIG
from core.openapi import ResponseModel, operation
from core.web import ApiError, json_response, read_body
from plugins.transports.chatchat.schemas import ChatchatBody, ChatRequest

LOCAL_KINDS = frozenset({"echo", "openai_compat"})
SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "header")
TEMPLATE_TYPE = "llm_chat"  # chatbus's templates are all of chatchat's llm_chat kind


class ModelTypes(ChatchatBody):
    types: list[str] = Field(default_factory=lambda: ["local", "online"])


class ModelName(ChatchatBody):
    model_name: str = Field(min_length=1)


class PromptTemplate(ChatchatBody):
    type: str = TEMPLATE_TYPE
    name: str = "default"


class ChatchatReply(ResponseModel):
    """chatchat's answer: `data` holds what was asked for."""

    code: int
    msg: str
    data: Any = None


class ServerConfigs(ResponseModel):
    """chatbus's public settings, under chatchat's names where it has one."""

    code: int
    msg: str
    LLM_MODELS: list[str]
    TEMPERATURE: float
    PROMPT_TEMPLATES: dict[str, dict[str, str]]
    api_address: str
    default_model: str
    max_query_chars: int
    history_backend: str


class TemplateText(RootModel[str]):
    """The template's text."""


TAGS = ["chatchat webui"]
NOT_FOUND = "No such model or template."


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/llm_model/list_running_models", list_running_models)
    router.add_post("/llm_model/list_config_models", list_config_models)
    router.add_post("/llm_model/get_model_config", get_model_config)
    router.add_post("/llm_model/change", not_here)
    router.add_post("/llm_model/stop", not_here)
    router.add_post("/server/configs", server_configs)
    router.add_post("/server/list_search_engines", list_search_engines)
    router.add_post("/server/get_prompt_template", get_prompt_template)


def success(data: Any) -> web.Response:
    return json_response({"code": 200, "msg": "success", "data": data})


@operation("The running models", responses={200: ChatchatReply}, tags=TAGS)
async def list_running_models(request: web.Request) -> web.Response:
    """Every configured model, the default first (chatchat's webui picks the first)."""
    config = request.app[CONFIG]
    return success({name: public_config(config, name) for name in model_names(config)})


@operation(
    "The configured models, local and online",
    request=ModelTypes,
    responses={200: ChatchatReply},
    errors={422: "An invalid field."},
    tags=TAGS,
)
async def list_config_models(request: web.Request) -> web.Response:
    body = await read_body(request, ModelTypes)
    config = request.app[CONFIG]
    data: dict[str, dict[str, Any]] = {
        kind: {} for kind in ("local", "online") if kind in body.types
    }
    for name in model_names(config):
        kind = "local" if is_local(config.models[name]) else "online"
        if kind in data:
            data[kind][name] = public_config(config, name)
    return success(data)


@operation(
    "A model's configuration, without secrets",
    request=ModelName,
    responses={200: ChatchatReply},
    errors={404: NOT_FOUND, 422: "An invalid field."},
    tags=TAGS,
)
async def get_model_config(request: web.Request) -> web.Response:
    body = await read_body(request, ModelName)
    config = request.app[CONFIG]
    if body.model_name not in config.models:
        raise ApiError(
            404,
            "not_found",
            f"model_name: unknown model '{body.model_name[:128]}'"
            f" (configured: {', '.join(model_names(config))})",
            field="model_name",
        )
    return success(public_config(config, body.model_name))


@operation(
    "Not here: chatbus loads no models itself",
    responses={},
    errors={501: "Always: change [models] in the configuration instead."},
    tags=TAGS,
)
async def not_here(request: web.Request) -> web.Response:
    raise ApiError(
        501,
        "not_implemented",
        "chatbus loads no models itself: every configured model is always available;"
        " change [models] in the configuration and restart instead",
    )


@operation("chatbus's public settings", responses={200: ServerConfigs}, tags=TAGS)
async def server_configs(request: web.Request) -> web.Response:
    """chatbus's public settings, under chatchat's names where it has one (chatchat answers
    this route with its settings themselves, not in a `data` field: so does chatbus)."""
    config = request.app[CONFIG]
    return json_response(
        {
            "code": 200,
            "msg": "success",
            "LLM_MODELS": model_names(config),
            "TEMPERATURE": ChatRequest.model_fields["temperature"].default,
            "PROMPT_TEMPLATES": {TEMPLATE_TYPE: dict(config.prompts)},
            "api_address": f"http://{config.server.host}:{config.server.port}",
            "default_model": config.default_model,
            "max_query_chars": config.chat.max_query_chars,
            "history_backend": config.history.backend,
        }
    )


@operation("The search engines (none)", responses={200: ChatchatReply}, tags=TAGS)
async def list_search_engines(request: web.Request) -> web.Response:
    return success([])  # chatbus has no search-engine chat


@operation(
    "A prompt template's text",
    request=PromptTemplate,
    responses={200: TemplateText},
    errors={404: NOT_FOUND, 422: "An invalid field."},
    tags=TAGS,
)
async def get_prompt_template(request: web.Request) -> web.Response:
    """The template's text, as a JSON string (what chatchat's server answers)."""
    body = await read_body(request, PromptTemplate)
    prompts = request.app[CONFIG].prompts
    if body.type != TEMPLATE_TYPE or body.name not in prompts:
        raise ApiError(
            404,
            "not_found",
            f"name: no {body.type[:40]} template '{body.name[:128]}' (chatbus has"
            f" {TEMPLATE_TYPE} templates only: {', '.join(sorted(prompts))})",
            field="name",
        )
    return json_response(prompts[body.name])


def model_names(config: Config) -> list[str]:
    """The configured models, the default first."""
    return [config.default_model, *sorted(set(config.models) - {config.default_model})]


def is_local(model: ModelConfig) -> bool:
    return model.provider in LOCAL_KINDS


def public_config(config: Config, name: str) -> dict[str, Any]:
    model = config.models[name]
    return {
        "provider": model.provider,
        **public(model.options()),
        "fallbacks": list(model.fallbacks),
        "online_api": not is_local(model),
        "default": name == config.default_model,
    }


def public(value: Any) -> Any:
    """`value` without whatever could be a secret (see the module's docstring)."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items() if not _secret_name(str(k))}
    if isinstance(value, list):
        return [public(item) for item in value]
    if isinstance(value, str) and "@" in value and "://" in value:
        return _without_credentials(value)
    return value


def _secret_name(key: str) -> bool:
    key = key.lower()
    return any(word in key for word in SECRET_WORDS) or key.endswith(("id", "_env"))


def _without_credentials(url: str) -> str:
    try:
        parsed = URL(url)
    except ValueError:
        return "[hidden]"
    if parsed.user is None and parsed.password is None:
        return url
    return str(parsed.with_user(None))
