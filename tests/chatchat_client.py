"""chatchat 0.2.x's own client of chatbus, as it runs: httpx (what chatchat uses), its
request body exactly as `ApiRequest.chat_chat` builds it, and its parsers of what httpx
delivers (`iter_text(None)`: a chunk at a time, as it arrived) copied from
`webui_pages/utils.py`, `_httpx_stream2generator`:

- v0.2.10: a chunk that fails to parse is logged and dropped;
- the 0.2.final branch: a chunk that fails to parse is kept (`chunk_cache`) and joined to
  the next one, so one bad chunk poisons every later one;
- v0.2.0 to v0.2.8: every chunk is parsed as a bare JSON object.

Nothing here paces or joins what the network delivers.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx

Parser = Callable[[Iterable[str]], list[dict[str, Any]]]
LLM_MODELS = ["chatglm3-6b", "zhipu-api", "openai-api"]  # chatchat's default configs
TEMPERATURE = 0.7


def chat_chat_body(query: str, model: str = LLM_MODELS[0], **given: Any) -> dict[str, Any]:
    """`ApiRequest.chat_chat(query, ...)`'s body: every field, null where left unset."""
    return {
        "query": query,
        "conversation_id": None,
        "history_len": -1,
        "history": [],
        "stream": True,
        "model_name": model,
        "temperature": TEMPERATURE,
        "max_tokens": None,
        "prompt_name": "default",
        **given,
    }


def parse_v0_2_10(chunks: Iterable[str]) -> list[dict[str, Any]]:
    results = []
    for chunk in chunks:
        if not chunk:
            continue
        try:
            if chunk.startswith("data: "):
                data = json.loads(chunk[6:-2])
            elif chunk.startswith(":"):
                continue
            else:
                data = json.loads(chunk)
            results.append(data)
        except Exception:
            pass  # logged: "接口返回json错误"
    return results


def parse_0_2_final(chunks: Iterable[str]) -> list[dict[str, Any]]:
    results, chunk_cache = [], ""
    for chunk in chunks:
        if not chunk:
            continue
        try:
            if chunk.startswith("data: "):
                data = json.loads(chunk_cache + chunk[6:-2])
            elif chunk.startswith(":"):
                continue
            else:
                data = json.loads(chunk_cache + chunk)
            chunk_cache = ""
            results.append(data)
        except Exception:
            if chunk.startswith("data: "):
                chunk_cache += chunk[6:-2]
            elif chunk.startswith(":"):
                continue
            else:
                chunk_cache += chunk
    return results


def parse_v0_2_8(chunks: Iterable[str]) -> list[dict[str, Any]]:
    results = []
    for chunk in chunks:
        if not chunk:
            continue
        try:  # noqa: SIM105 (chatchat's own code)
            results.append(json.loads(chunk))
        except Exception:
            pass  # logged
    return results


PARSERS: dict[str, Parser] = {
    "v0.2.10": parse_v0_2_10,
    "0.2.final": parse_0_2_final,
}


def text_of(results: list[dict[str, Any]]) -> str:
    """What the webui shows: the `text` of every result, added up."""
    return "".join(result.get("text", "") for result in results)


def check_error_msg(data: Any, key: str = "errorMsg") -> str:
    """chatchat's own (webui_pages/utils.py): how its webui tells an answer is an error."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        if "code" in data and data["code"] != 200:
            return data["msg"]
    return ""


async def read_chunks(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[str]:
    """POST like `ApiRequest.post(..., stream=True)`; every text chunk httpx delivers."""
    async with client.stream("POST", url, json=body) as response:
        return [chunk async for chunk in _texts(response)]


def read_chunks_sync(url: str, body: dict[str, Any]) -> list[str]:
    """The same with httpx's sync client, as chatchat's (streamlit) webui runs it."""
    with httpx.Client(timeout=30) as client, client.stream("POST", url, json=body) as response:
        return list(response.iter_text(None))


async def _texts(response: httpx.Response) -> AsyncIterator[str]:
    async for chunk in response.aiter_text(None):
        yield chunk
