"""What a model provider is, the errors it raises, and the registry of configured models.

A provider turns one `ModelCall` into an async iterator of text deltas. It may yield one
`Usage` (usually last). Deltas never go through pluggy: they flow straight to the transport.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import aiohttp
from pydantic import ValidationError

from core.config import ConfigError, ModelConfig, first_problem

Message = dict[str, str]  # {"role": ..., "content": ...}, the OpenAI shape


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ModelCall:
    messages: list[Message]
    temperature: float = 0.7
    max_tokens: int | None = None  # None: the model's own limit


@runtime_checkable
class Provider(Protocol):
    def stream(self, call: ModelCall) -> AsyncIterator[str | Usage]: ...


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A configured model as a provider factory sees it."""

    name: str
    provider: str
    options: dict[str, Any] = field(default_factory=dict)


# A factory builds a provider for one configured model; it may share the app's HTTP session.
ProviderFactory = Callable[[ModelSpec, aiohttp.ClientSession], Provider]


class ProviderError(Exception):
    """An upstream failure, in a type a client can act on. `type` goes on the wire."""

    type = "upstream_error"
    retryable = False


class UpstreamUnavailable(ProviderError):
    type = "upstream_unavailable"  # could not connect, 5xx, or the connection broke
    retryable = True


class UpstreamTimeout(ProviderError):
    type = "upstream_timeout"
    retryable = True


class RateLimited(ProviderError):
    type = "rate_limited"
    retryable = True
    retry_after: str | None = None  # the upstream's Retry-After, when it sent one


class AuthenticationFailed(ProviderError):
    type = "authentication_failed"


class BadRequest(ProviderError):
    type = "bad_request"


class ContextWindowExceeded(BadRequest):
    type = "context_window_exceeded"


class MalformedResponse(ProviderError):
    type = "malformed_response"


class ModelRegistry:
    """The configured models, each bound to a provider built by its kind's factory."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = dict(providers)

    @classmethod
    def build(
        cls,
        models: Mapping[str, ModelConfig],
        factories: Mapping[str, ProviderFactory],
        http: aiohttp.ClientSession,
    ) -> ModelRegistry:
        providers = {}
        for name, model in models.items():
            factory = factories.get(model.provider)
            if factory is None:
                known = ", ".join(sorted(factories))
                raise ConfigError(
                    f"models.{name}.provider: unknown provider kind '{model.provider}'"
                    f" (known: {known})"
                )
            spec = ModelSpec(name=name, provider=model.provider, options=model.options())
            try:
                providers[name] = factory(spec, http)
            except ValidationError as exc:
                raise ConfigError(first_problem(exc, f"models.{name}")) from None
            except ValueError as exc:
                raise ConfigError(f"models.{name}: {exc}") from None
        return cls(providers)

    @property
    def names(self) -> list[str]:
        return sorted(self._providers)

    def get(self, name: str) -> Provider | None:
        return self._providers.get(name)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                await close()
