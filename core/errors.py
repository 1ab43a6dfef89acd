"""The chat service's errors: what went wrong, in the domain's words. Which HTTP status and
body each becomes is decided at the edge (core/web.py, and a transport with a wire format
of its own), never here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from core.history import StoreUnavailable

__all__ = [
    "CallbackNotAllowed",
    "ChatError",
    "MessageNotFound",
    "StoreUnavailable",
    "UnknownModel",
    "UnknownPrompt",
]


class ChatError(Exception):
    """A request the service cannot serve as asked. `type` goes on the wire; `field` names
    the request field at fault, where one is."""

    type: ClassVar[str] = "bad_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class UnknownModel(ChatError):
    type = "unknown_model"

    def __init__(self, name: str, known: Sequence[str], field: str = "model_name") -> None:
        self.name, self.known = name, list(known)
        super().__init__(
            f"{field}: unknown model '{name[:128]}' (configured: {', '.join(known)})", field
        )


class UnknownPrompt(ChatError):
    type = "unknown_prompt"

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(
            f"prompt_name: unknown prompt '{name[:128]}' (configured: {', '.join(known)})",
            "prompt_name",
        )


class MessageNotFound(ChatError):
    type = "not_found"

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message_id: no message '{message_id[:128]}'", "message_id")


class CallbackNotAllowed(ChatError):
    type = "callback_not_allowed"

    def __init__(self, problem: str) -> None:
        super().__init__(f"callback_url: {problem}", "callback_url")
