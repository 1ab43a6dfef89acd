"""The request body of `POST /v1/chat/completions`, as OpenAI's clients send it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.providers import TYPED_PARAMS, GenerationParams, Message

ROLES = ("system", "developer", "user", "assistant", "tool")
# Content parts a provider may take besides text (OpenAI's names), and the key each needs.
PART_KEYS = {"text": "text", "image_url": "image_url", "input_audio": "input_audio", "file": "file"}
# Fields chatbus cannot honour: a 400 naming each beats an answer that silently lacks it.
REFUSED = {
    "logprobs": "log probabilities are not relayed by chatbus",
    "top_logprobs": "log probabilities are not relayed by chatbus",
    "functions": "the deprecated functions API is not supported: send `tools`",
    "function_call": "the deprecated functions API is not supported: send `tool_choice`",
    "audio": "audio answers are not supported",
}


class ToolCallParam(BaseModel):
    """An assistant's earlier tool call, as the client sends it back."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: dict[str, Any]

    @field_validator("function")
    @classmethod
    def _named(cls, function: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(function.get("name"), str):
            raise ValueError("a tool call's function needs a name")
        return function


class CompletionMessage(BaseModel):
    """One message in OpenAI's shape; sent on as the client sent it (what it set, and any
    other key), but for `developer` (sent as `system`) and a list of text parts only (their
    texts, one a line)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = Field(None, validate_default=True)

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, tool_call_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not tool_call_id:
            raise ValueError("a tool message answers a call: it needs the call's id")
        return tool_call_id

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content: object) -> object:
        if not isinstance(content, list):
            return content
        for part in content:
            key = PART_KEYS.get(str(part.get("type"))) if isinstance(part, dict) else None
            if key is None or not part.get(key):
                raise ValueError(
                    "content parts are {type: text | image_url | input_audio | file} objects,"
                    " each with its own field"
                )
            if key == "image_url" and not isinstance(part["image_url"].get("url"), str):
                raise ValueError("an image_url part needs its url")
        if all(part["type"] == "text" for part in content):
            return "\n".join(str(part["text"]) for part in content)
        return content

    @model_validator(mode="after")
    def _role_fields(self) -> CompletionMessage:
        if self.content is None and not self.tool_calls:
            self.content = ""  # as a missing content has always been read
        return self

    def as_sent(self) -> Message:
        message = self.model_dump(exclude_unset=True)
        message["content"] = self.content
        if self.role == "developer":  # OpenAI's newer name; other servers know `system`
            message["role"] = "system"
        return message

    def attachments(self) -> tuple[dict[str, Any], ...]:
        """The parts besides text (images, audio, files)."""
        if not isinstance(self.content, list):
            return ()
        return tuple(part for part in self.content if part["type"] != "text")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part["text"] for part in self.content if part["type"] == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's request body: the generation parameters in `params()` (typed, or any other
    field passed through as is), chatbus's own fields, and REFUSED ones answered 400."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the configured default model
    messages: list[CompletionMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None  # one choice only: see _one_choice
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name: wins over max_tokens
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # REFUSED
    logprobs: Any = None
    top_logprobs: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    # chatbus's own fields
    conversation_id: str = ""
    history_len: int | None = None  # None: [chat] default_history_len
    prompt_name: str = "default"

    @field_validator("tools")
    @classmethod
    def _functions(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for tool in tools or ():
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict):
                raise ValueError('each tool is {"type": "function", "function": {...}}')
            if not isinstance(function.get("name"), str):
                raise ValueError("each tool's function needs a name")
        return tools

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("chatbus answers with one choice: n must be 1")
        return n

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, value: object, info: ValidationInfo) -> object:
        if value not in (None, False):
            raise ValueError(REFUSED[str(info.field_name)])
        return value

    def params(self) -> GenerationParams:
        """The generation parameters, by GenerationParams' own names (each typed one is a
        field here); max_completion_tokens, OpenAI's newer name, wins over max_tokens."""
        given = {name: getattr(self, name) for name in TYPED_PARAMS}
        if self.max_completion_tokens is not None:
            given["max_tokens"] = self.max_completion_tokens
        if given["max_tokens"] is not None and given["max_tokens"] <= 0:
            given["max_tokens"] = None
        return GenerationParams(**given, extra=self.model_extra or {})
