"""The configured models: each bound to a provider, with its retries and fallbacks, and
what is known of whether it answers."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from pydantic import ValidationError

from core.config import ConfigError, ModelConfig
from core.providers import ModelSpec, Provider, ProviderError, ProviderFactory, RateLimited
from core.retry_after import retry_after_seconds
from core.validation import first_problem

log = structlog.get_logger("chatbus.chat")
MAX_RETRY_AFTER = 30.0  # seconds: an upstream's Retry-After longer than this is not waited for


@dataclass(slots=True)
class Health:
    """What the last call said of a model: None until it was called."""

    reachable: bool | None = None
    checked_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that failed before the client had text: a retry or a fallback followed."""

    model: str
    error: ProviderError


@dataclass(frozen=True, slots=True)
class Route:
    """One configured model as the chat service calls it."""

    name: str
    kind: str
    provider: Provider
    retries: int
    retry_backoff: float
    fallbacks: tuple[str, ...]
    health: Health = field(default_factory=Health)
    # The model's own answer limits; None: [chat]'s (see ModelConfig).
    max_answer_chars: int | None = None
    answer_timeout_seconds: float | None = None

    def delay(self, attempt: int, error: ProviderError) -> float:
        """Seconds before retry `attempt` (1, 2, ...): exponential with jitter, or what the
        upstream asked for with a usable Retry-After (at most MAX_RETRY_AFTER)."""
        if isinstance(error, RateLimited):
            asked = retry_after_seconds(error.retry_after, MAX_RETRY_AFTER)
            if asked is not None:
                return asked
        return self.retry_backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)

    def record(self, error: ProviderError | None) -> None:
        self.health.reachable = error is None or not error.retryable
        self.health.checked_at = time.time()
        self.health.last_error = error.type if error is not None else None


class ModelRegistry:
    def __init__(self, routes: Mapping[str, Route]) -> None:
        self._routes = dict(routes)

    @classmethod
    def build(
        cls,
        models: Mapping[str, ModelConfig],
        factories: Mapping[str, ProviderFactory],
        http: aiohttp.ClientSession,
    ) -> ModelRegistry:
        routes = {}
        for name, model in models.items():
            factory = factories.get(model.provider)
            if factory is None:
                known = ", ".join(sorted(factories))
                raise ConfigError(
                    f"models.{name}.provider: unknown provider kind '{model.provider}'"
                    f" (known: {known})"
                )
            for fallback in model.fallbacks:
                if fallback not in models or fallback == name:
                    raise ConfigError(
                        f"models.{name}.fallbacks: '{fallback}' is not another configured model"
                    )
            spec = ModelSpec(name=name, provider=model.provider, options=model.options())
            try:
                provider = factory(spec, http)
            except ValidationError as exc:
                raise ConfigError(first_problem(exc, f"models.{name}")) from None
            except ValueError as exc:
                raise ConfigError(f"models.{name}: {exc}") from None
            routes[name] = Route(
                name,
                model.provider,
                provider,
                model.retries,
                model.retry_backoff,
                tuple(model.fallbacks),
                max_answer_chars=model.max_answer_chars,
                answer_timeout_seconds=model.answer_timeout_seconds,
            )
        return cls(routes)

    @property
    def names(self) -> list[str]:
        return sorted(self._routes)

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def chain(self, name: str) -> Iterator[Route]:
        """The model, then its fallbacks in order."""
        route = self._routes[name]
        yield route
        for fallback in route.fallbacks:
            yield self._routes[fallback]

    async def answer(
        self,
        name: str,
        attempt: Callable[[Route], Awaitable[None]],
        answered: Callable[[], bool],
        failures: list[Failure],
    ) -> None:
        """`attempt` with the model, then its retries, then its fallbacks, until one call
        succeeds; else the last error. Once `answered()` (the client has text), nothing is
        retried: a failure then is final. Each failed attempt before is added to `failures`."""
        error: ProviderError | None = None
        for route in self.chain(name):
            for tried in range(route.retries + 1):
                if tried:
                    assert error is not None
                    await asyncio.sleep(route.delay(tried, error))
                try:
                    await attempt(route)
                except ProviderError as exc:
                    route.record(exc)
                    if answered():
                        raise
                    error = exc
                    failures.append(Failure(route.name, exc))
                    # The message is safe to log: providers redact their keys from it.
                    log.warning("model failed", model=route.name, attempt=tried + 1,
                                error=exc.type, message=str(exc))  # fmt: skip
                    if not exc.retryable:
                        break
                else:
                    route.record(None)
                    return
        assert error is not None
        raise error

    def describe(self, default: str) -> list[dict[str, Any]]:
        return [
            {
                "name": route.name,
                "provider": route.kind,
                "default": route.name == default,
                "fallbacks": list(route.fallbacks),
                "reachable": route.health.reachable,
                "checked_at": route.health.checked_at,
                "last_error": route.health.last_error,
            }
            for route in sorted(self._routes.values(), key=lambda route: route.name)
        ]

    async def open(self) -> None:
        for route in self._routes.values():
            opener = getattr(route.provider, "open", None)
            if opener is not None:
                await opener()

    async def aclose(self) -> None:
        for route in self._routes.values():
            close = getattr(route.provider, "aclose", None)
            if close is not None:
                await close()
