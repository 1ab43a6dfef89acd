"""Prompt templates: jinja2, sandboxed, compiled once from `[prompts]`.

The user's query reaches a template only as the value of `input`, so braces and `{{ }}` in
it are text, never template code. History is never rendered at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.config import ConfigError

# A template that is its input alone (`default`'s): rendering it gives the query back, as
# jinja2 would (autoescape is off), without its cost (some 10 µs a chat).
VERBATIM = re.compile(r"\{\{\s*input\s*\}\}")


class PromptTemplates:
    def __init__(self, sources: Mapping[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)
        self._templates = {}
        self._verbatim = {name for name, source in sources.items() if VERBATIM.fullmatch(source)}
        for name, source in sources.items():
            try:
                self._templates[name] = env.from_string(source)
            except TemplateSyntaxError as exc:
                raise ConfigError(f"prompts.{name}: template error: {exc}") from None

    @property
    def names(self) -> list[str]:
        return sorted(self._templates)

    def __contains__(self, name: str) -> bool:
        return name in self._templates

    def render(self, name: str, query: str) -> str:
        if name in self._verbatim:
            return query
        return self._templates[name].render(input=query)
