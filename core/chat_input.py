"""What a chat asks for, in no transport's words: each transport turns its own body into a
`ChatInput`, and the chat service takes nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.providers import GenerationParams, Message


@dataclass(frozen=True, slots=True)
class ChatInput:
    """One chat request: the user's query (rendered through the prompt template), the
    client's own history, and how to answer it."""

    query: str
    history: tuple[Message, ...] = ()  # the client's messages before the query, as sent
    conversation_id: str = ""
    history_len: int = 0  # stored turns of the conversation to read (see stored_turns_wanted)
    model: str | None = None  # None: the configured default model
    prompt_name: str = "default"
    callback_url: str | None = None  # async mode: the end of the chat is delivered there
    stream: bool = False
    params: GenerationParams = field(default_factory=GenerationParams)
    # The query's parts besides its text (images, audio, files): sent with it, not stored.
    attachments: tuple[dict[str, Any], ...] = ()
    # Tool results answering the last turn's tool calls: sent instead of a user message.
    tool_results: tuple[Message, ...] = ()


def stored_turns_wanted(
    conversation_id: str, history: Sequence[Message] | None, history_len: int
) -> int:
    """How many stored turns to read: none without a conversation, none when the client's
    history holds a user's or an assistant's message (it is the history then). System
    messages alone are instructions, not history: the stored turns follow them."""
    if not conversation_id:
        return 0
    if history and any(message.get("role") != "system" for message in history):
        return 0
    return max(history_len, 0)
