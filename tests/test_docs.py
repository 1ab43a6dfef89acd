"""docs/plugins.md documents every hook, and every hook is tested."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pluggy
import pytest

from core import hookspecs
from core.events import LIFECYCLE_EVENTS, Event

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
TESTS = Path(__file__).resolve().parent


def hook_names() -> list[str]:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    names = sorted(name for name in vars(pm.hook) if not name.startswith("_"))
    # The same set, found by the marker itself: a hook pluggy would not list is a bug here.
    marked = sorted(
        name
        for name, value in vars(hookspecs).items()
        if callable(value) and hasattr(value, f"{hookspecs.PROJECT}_spec")
    )
    assert names == marked
    return names


HOOKS = hook_names()


def doc_sections() -> dict[str, str]:
    """`### \\`name\\`` headings of docs/plugins.md and the text under each, up to the next
    `##` or `###` heading."""
    text = PLUGINS_DOC.read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    for match in re.finditer(r"^### `(\w+)`[ \t]*\n(.*?)(?=^##|\Z)", text, re.M | re.S):
        sections[match.group(1)] = match.group(2)
    return sections


def test_there_are_hooks_to_check() -> None:
    assert len(HOOKS) >= 10
    assert {"register_providers", "prepare_messages", "chat_completed"} <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_in_the_plugin_docs(hook: str) -> None:
    assert hook in doc_sections(), f"docs/plugins.md has no '### `{hook}`' section"


def test_the_docs_document_no_hook_that_does_not_exist() -> None:
    assert set(doc_sections()) <= set(HOOKS)


@pytest.mark.parametrize("event", LIFECYCLE_EVENTS, ids=lambda event: event.hook)
def test_every_lifecycle_event_field_is_documented_in_its_hook_section(
    event: type[Event],
) -> None:
    section = doc_sections().get(event.hook, "")
    missing = [
        field.name for field in dataclasses.fields(event) if f"`{field.name}`" not in section
    ]
    assert not missing, f"docs/plugins.md, ### `{event.hook}`: fields not named: {missing}"


def sources_of_tests() -> dict[Path, str]:
    """The test modules, this one left out. Fixture modules (conftest.py, whose recorder
    implements every lifecycle hook for every test, the fake servers, the helpers) are not
    tests: a hook they implement is not thereby tested."""
    return {
        path: path.read_text(encoding="utf-8")
        for path in sorted(TESTS.rglob("test_*.py"))
        if path.resolve() != Path(__file__).resolve()
    }


def test_fixture_modules_do_not_count_as_tests() -> None:
    names = {path.name for path in sources_of_tests()}
    assert "conftest.py" not in names and "fake_upstream.py" not in names
    assert "test_bus.py" in names


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_implemented_or_called_by_a_test(hook: str) -> None:
    """A test module implements it (`def <hook>(`) or calls it explicitly (`hook.<hook>(`)."""
    pattern = re.compile(rf"\bdef {hook}\(|\bhook\.{hook}\(")
    testing = [path.name for path, source in sources_of_tests().items() if pattern.search(source)]
    assert testing, f"no test under tests/ implements or calls the hook {hook}"


def test_the_docs_name_every_built_in_plugin() -> None:
    from core.plugins import BUILTIN_PLUGINS

    text = PLUGINS_DOC.read_text(encoding="utf-8")
    missing = [
        name
        for name in BUILTIN_PLUGINS
        if f"`{name}`" not in text and f"`.{name.rsplit('.', 1)[1]}`" not in text
    ]
    assert missing == []
