"""chatchat's request bodies, validated with pydantic at the edge (never per token), and
the chat input a `/chat/chat` body asks for."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from core.chat_input import ChatInput, stored_turns_wanted
from core.providers import GenerationParams
from core.validation import query_problem

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
        problem = query_problem(query, (info.context or {}).get("max_query_chars"))
        if problem is not None:
            raise ValueError(problem)
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

    def chat_input(self) -> ChatInput:
        """What this body asks the chat service for: a list is the history, an integer N
        reads N stored turns; chatchat's own temperature default (0.7) is sent."""
        history = self.history if isinstance(self.history, list) else []
        messages = tuple(message.model_dump() for message in history)
        if isinstance(self.history, int):
            wanted = stored_turns_wanted(self.conversation_id, (), self.history)
        else:
            wanted = stored_turns_wanted(self.conversation_id, messages, self.history_len)
        return ChatInput(
            query=self.query,
            history=messages,
            conversation_id=self.conversation_id,
            history_len=wanted,
            model=self.model_name,
            prompt_name=self.prompt_name,
            callback_url=self.callback_url,
            stream=self.stream,
            params=GenerationParams(temperature=self.temperature, max_tokens=self.max_tokens),
        )
