"""Request bodies, validated with pydantic at the edge (never per token)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# chatchat's own names for the two sides of a conversation (its `History`, langchain's roles)
ROLE_ALIASES = {"human": "user", "ai": "assistant"}


class HistoryMessage(BaseModel):
    """One past message: `{"role", "content"}`, or chatchat's `[role, content]` pair
    (`History.from_data`); `human` and `ai` are chatchat's names for user and assistant."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant", "system"]
    content: str

    @model_validator(mode="before")
    @classmethod
    def _chatchat_forms(cls, data: Any) -> Any:
        if isinstance(data, list | tuple) and len(data) >= 2:
            data = {"role": data[0], "content": data[1]}
        if isinstance(data, dict) and isinstance(data.get("role"), str):
            data = {**data, "role": ROLE_ALIASES.get(data["role"], data["role"])}
        return data


class ChatchatBody(BaseModel):
    """A chatchat request body: unknown keys are ignored (clients of later versions send
    more), and null means the field's default, as chatchat's server reads it (its clients
    send null for every field they leave unset)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class ChatRequest(ChatchatBody):
    """chatchat 0.2.x `/chat/chat` body."""

    query: str
    conversation_id: str = Field("", max_length=128)
    history_len: int = -1
    # A list is used as is; an integer N reads N turns of `conversation_id` from the store.
    history: list[HistoryMessage] | int = []
    stream: bool = False
    model_name: str | None = None  # None: the configured default model
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int | None = None  # None or <= 0: the model's own limit
    prompt_name: str = "default"
    # Async mode: answer 202 at once and deliver the end of the chat to this URL.
    callback_url: str | None = Field(None, max_length=2048)

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, query: str, info: ValidationInfo) -> str:
        if not query.strip():
            raise ValueError("must not be empty")
        limit = (info.context or {}).get("max_query_chars")
        if limit is not None and len(query) > limit:
            raise ValueError(f"must be at most {limit} characters (got {len(query)})")
        return query

    @field_validator("history", mode="before")
    @classmethod
    def _history_shape(cls, history: object) -> object:
        if isinstance(history, bool) or not isinstance(history, list | int):
            raise ValueError("must be a list of {role, content} messages or a number of turns")
        return history

    @field_validator("max_tokens")
    @classmethod
    def _non_positive_is_none(cls, max_tokens: int | None) -> int | None:
        return max_tokens if max_tokens is not None and max_tokens > 0 else None

    def turns_to_read(self) -> int:
        """How many past turns to read from the store: none when the history is given.
        System messages alone are instructions, not history: the stored turns follow them."""
        if not self.conversation_id:
            return 0
        if isinstance(self.history, int):
            return max(self.history, 0)
        if any(message.role != "system" for message in self.history):
            return 0
        return max(self.history_len, 0)
