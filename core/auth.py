"""API keys and tenants. With `[auth] keys` configured, every request carries
`Authorization: Bearer <key>`, but those to the routes marked `@operation(public=True)`
(core/openapi.py: the health checks, the API's docs); the key names its tenant, and the
tenant scopes everything stored. Keys are kept only as SHA-256 digests (from the file, or
hashed from an environment variable at start-up) and never logged."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Any

from aiohttp import web

from core.config import AuthConfig, ConfigError
from core.logs import log_context
from core.openapi import is_public
from core.web import TENANT, ApiError

DEFAULT_TENANT = "default"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenants_by_digest(auth: AuthConfig) -> dict[str, str]:
    """Key digest -> tenant; a key named by an unset variable is a configuration error."""
    found = {}
    for name, key in auth.keys.items():
        if key.key_env is not None:
            secret = os.environ.get(key.key_env)
            if not secret:
                raise ConfigError(f"auth.keys.{name}.key_env: {key.key_env} is not set")
            found[digest(secret)] = key.tenant
        else:
            assert key.sha256 is not None
            found[key.sha256.lower()] = key.tenant
    return found


def middleware(auth: AuthConfig) -> Any:
    tenants = tenants_by_digest(auth)

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        if tenants and not is_public(request.match_info.handler):
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            tenant = tenants.get(digest(key.strip())) if scheme.lower() == "bearer" else None
            if tenant is None:
                raise ApiError(401, "unauthorized", "a valid API key is required:"
                               " Authorization: Bearer <key>")  # fmt: skip
        else:
            tenant = DEFAULT_TENANT
        request[TENANT] = tenant
        with log_context(tenant=tenant):
            return await handler(request)

    return authenticate


def check_exposure(host: str, auth: AuthConfig) -> None:
    """Refuse to listen beyond loopback with no API keys, unless the config says so."""
    if auth.keys or auth.allow_public_without_keys or is_loopback(host):
        return
    raise ConfigError(
        f"server.host: refusing to listen on {host} without [auth] keys (anyone could chat"
        " and read every conversation); add keys, or set auth.allow_public_without_keys = true"
    )


def is_loopback(host: str) -> bool:
    """`localhost`, or an address of 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
