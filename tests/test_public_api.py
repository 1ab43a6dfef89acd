"""The public plugin API (chatbus/__init__.py): one module, every name in `__all__` there,
and the plugins and docs use it rather than core's own modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import chatbus

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_is_there() -> None:
    assert len(chatbus.__all__) == len(set(chatbus.__all__))
    missing = [name for name in chatbus.__all__ if not hasattr(chatbus, name)]
    assert missing == []
    assert {"hookimpl", "ModelCall", "Usage", "HistoryStore", "ChatCompleted"} <= set(
        chatbus.__all__
    )


def test_everything_it_imports_is_public() -> None:
    tree = ast.parse((ROOT / "chatbus" / "__init__.py").read_text())
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for alias in node.names
    }
    assert imported == set(chatbus.__all__)


def core_imports(path: Path) -> list[str]:
    return re.findall(r"^\s*(?:from core[.\w]* import|import core\b).*$", path.read_text(), re.M)


def test_the_example_plugin_and_the_docs_import_chatbus_only() -> None:
    example = ROOT / "examples" / "chatbus-provider-example" / "chatbus_provider_example.py"
    assert core_imports(example) == []
    for doc in (ROOT / "docs" / "plugins.md", ROOT / "README.md"):
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
        assert blocks
        assert [
            line for block in blocks for line in block.splitlines() if "from core" in line
        ] == []


def test_the_domain_knows_no_http() -> None:
    """The chat service and its turn raise domain errors (core/errors.py); HTTP statuses
    are chosen at the edge (core/web.py) and by the transports."""
    server = re.compile(r"^\s*(from aiohttp import web|from aiohttp\.web|from core\.web)", re.M)
    for name in ("chat.py", "turn.py", "errors.py", "events.py", "history.py", "providers.py"):
        assert not server.search((ROOT / "core" / name).read_text()), name
