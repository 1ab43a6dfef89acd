"""examples/chatbus-provider-example: a provider kind added from outside, through an installed
distribution's entry point, with no change to chatbus (installed by the Makefile's venv)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import aiohttp
import chatbus_provider_example  # installed by the Makefile's venv recipe
import pytest

from core.app import open_service
from core.config import ConfigError
from core.events import ChatCompleted
from core.plugins import make_plugin_manager, provider_factories
from core.providers import ModelCall, ModelSpec, Provider, Usage
from tests.conftest import StartChatbus, make_config


def test_the_distribution_declares_its_entry_point() -> None:
    (entry_point,) = [
        ep for ep in importlib.metadata.entry_points(group="chatbus") if ep.name == "example"
    ]
    assert entry_point.value == "chatbus_provider_example"
    assert entry_point.dist is not None
    assert entry_point.dist.name == "chatbus-provider-example"
    assert entry_point.load() is chatbus_provider_example


def test_make_plugin_manager_registers_it() -> None:
    pm = make_plugin_manager()
    assert pm.get_plugin("example") is sys.modules["chatbus_provider_example"]
    factories = provider_factories(pm)
    assert factories["reverse"] is chatbus_provider_example.make_reverse
    assert {"echo", "openai_compat", "reverse"} <= set(factories)


def test_without_entry_points_the_kind_is_unknown() -> None:
    assert "reverse" not in provider_factories(make_plugin_manager(entry_points=False))


async def test_a_configured_model_streams_end_to_end(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(models={"backwards": {"provider": "reverse"}})
    stream = await chatbus.chat(query="one two three", model_name="backwards")
    assert stream.status == 200
    assert stream.text == "three two one"
    assert [frame["text"] for frame in stream.frames] == ["three", " two", " one"]
    (completed,) = await chatbus.events.wait_for("chat_completed")
    assert isinstance(completed, ChatCompleted)
    assert completed.model == "backwards"
    assert completed.usage == Usage(prompt_tokens=3, completion_tokens=3)
    record = await chatbus.store.get_message("default", completed.message_id)
    assert record is not None
    assert (record.response, record.status) == ("three two one", "completed")


async def test_its_option_is_used(start_chatbus: StartChatbus) -> None:
    chatbus = await start_chatbus(models={"loud": {"provider": "reverse", "upper": True}})
    status, body = await chatbus.chat_json(query="hello big world", model_name="loud")
    assert (status, body["text"]) == (200, "WORLD BIG HELLO")


async def test_the_provider_itself() -> None:
    spec = ModelSpec(name="backwards", provider="reverse", options={})
    async with aiohttp.ClientSession() as http:  # what chatbus hands a factory; unused here
        provider = chatbus_provider_example.make_reverse(spec, http)
    assert isinstance(provider, Provider)
    call = ModelCall(
        [
            {"role": "user", "content": "earlier question"},
            {"role": "assistant", "content": "earlier answer"},
            {"role": "user", "content": "a b c d"},
        ],
        max_tokens=2,
    )
    pieces = [piece async for piece in provider.stream(call)]
    assert pieces == ["d", " c", Usage(prompt_tokens=8, completion_tokens=2)]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"shout": True}, "models.backwards.shout: unknown key"),
        ({"upper": "maybe"}, "models.backwards.upper: Input should be a valid boolean"),
        ({"delay": -1}, "models.backwards.delay: Input should be greater than or equal to 0"),
    ],
)
async def test_a_bad_option_is_a_one_line_config_error(
    tmp_path: Path, options: dict[str, object], expected: str
) -> None:
    config = make_config(tmp_path, models={"backwards": {"provider": "reverse", **options}})
    with pytest.raises(ConfigError) as info:
        async with open_service(config):
            pass
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message
