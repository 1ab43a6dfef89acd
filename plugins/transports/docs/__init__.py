"""The API described: `GET /openapi.json` (OpenAPI 3.1, built from the routes the app has,
every plugin's included: core/openapi.py) and `GET /docs`, a page rendering it with Redoc.

Redoc is vendored and pinned (static/, see its README.md) and served by chatbus itself: the
page loads nothing from elsewhere (no CDN, no web fonts), and its Content-Security-Policy
stops what the script would fetch from elsewhere (Redocly's logo). Neither route needs an
API key.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import web

from core.hookspecs import hookimpl
from core.openapi import Content, document, operation
from core.web import json_response

REDOC_VERSION = "2.5.1"
SCRIPT_PATH = "/docs/redoc.standalone.js"
PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chatbus API</title>
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="{SCRIPT_PATH}"></script>
</body>
</html>
"""
# Redoc styles itself inline and runs its search in a worker made from a blob.
PAGE_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " worker-src 'self' blob:; font-src 'self' data:"
)
TAGS = ["docs"]


@hookimpl
def register_routes(app: web.Application, router: web.UrlDispatcher) -> None:
    router.add_get("/openapi.json", openapi_json)
    router.add_get("/docs", docs_page)
    router.add_get(SCRIPT_PATH, redoc_script)


@operation(
    "This document",
    responses={200: Content("application/json", "The OpenAPI 3.1 document.")},
    tags=TAGS,
    public=True,
)
async def openapi_json(request: web.Request) -> web.Response:
    return json_response(document(request.app))


@operation(
    "The API's docs page",
    responses={200: Content("text/html", "A page rendering /openapi.json (Redoc).")},
    tags=TAGS,
    public=True,
)
async def docs_page(request: web.Request) -> web.Response:
    return web.Response(
        text=PAGE, content_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY}
    )


@operation(
    "Redoc, the docs page's script",
    responses={200: Content("application/javascript", f"Redoc {REDOC_VERSION}, MIT.")},
    tags=TAGS,
    public=True,
)
async def redoc_script(request: web.Request) -> web.Response:
    return web.Response(body=redoc_bundle(), content_type="application/javascript")


@cache
def redoc_bundle() -> bytes:
    """The vendored script, read from the installed package (once)."""
    return (files(__package__) / "static" / "redoc.standalone.js").read_bytes()
