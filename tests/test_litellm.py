"""The litellm provider: against the fake upstream over real HTTP (litellm's OpenAI path),
with litellm's `mock_response` for other providers' errors, and through chatbus end to end.

litellm is imported once for the whole session (by the first test that needs it); the
checks that chatbus never imports it unasked, and that its import stays offline, run in
fresh interpreters.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from chatbus.testing.fake_upstream import DEFAULT_TOKENS, Behaviour, FakeUpstream
from core.config import first_problem
from core.history import Status
from core.providers import (
    AuthenticationFailed,
    BadRequest,
    ContextWindowExceeded,
    Finish,
    MalformedResponse,
    ModelCall,
    ModelSpec,
    ProviderError,
    RateLimited,
    Reasoning,
    ToolCallDelta,
    UpstreamTimeout,
    UpstreamUnavailable,
    Usage,
)
from plugins.providers.litellm import (
    LiteLLMProvider,
    close_shared_session,
    load_litellm,
    make_litellm,
)
from tests.conftest import StartChatbus
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello please"},
]
KEY_VAR = "CHATBUS_TEST_LITELLM_KEY"
KEY = "sk-litellm-test-123"
# litellm 1.110 reads pydantic attributes pydantic 2.11 deprecated: its business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:litellm")


@pytest.fixture(autouse=True)
async def closed_after() -> AsyncIterator[None]:
    """The providers made here are never opened by an app: close what they share after each."""
    yield
    await close_shared_session()


@pytest.fixture
async def litellm() -> ModuleType:
    return await load_litellm()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_VAR, KEY)
    return KEY


def make(**options: Any) -> LiteLLMProvider:
    return make_litellm(ModelSpec(name="m", provider="litellm", options=options))


def provider_for(upstream: FakeUpstream, **options: Any) -> LiteLLMProvider:
    return make(
        **{
            "model": "openai/fake-model",
            "api_base": upstream.base_url,
            "api_key_env": KEY_VAR,
            "timeout": 5,
            **options,
        }
    )


async def collect(
    provider: LiteLLMProvider, call: ModelCall | None = None
) -> tuple[list[str], list[Usage]]:
    pieces: list[str] = []
    usages: list[Usage] = []
    async for item in provider.stream(call or ModelCall(messages=MESSAGES)):
        if isinstance(item, Usage):
            usages.append(item)
        elif not isinstance(item, Finish):  # the finish reason: tested on its own
            assert isinstance(item, str)
            assert not usages, "a piece after the usage"
            pieces.append(item)
    return pieces, usages


async def failure(
    provider: LiteLLMProvider, call: ModelCall | None = None
) -> tuple[ProviderError, list[str]]:
    pieces: list[str] = []
    with pytest.raises(ProviderError) as info:
        async for item in provider.stream(call or ModelCall(messages=MESSAGES)):
            if not isinstance(item, Finish):
                assert isinstance(item, str)
                pieces.append(item)
    return info.value, pieces


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the lazy import ----------------------------------------------------------------------


def test_chatbus_never_imports_litellm_unasked() -> None:
    """Importing chatbus, building its plugins, app and a litellm model: no litellm."""
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    done = run_python(
        """
        import sys
        import core.app, core.cli, core.server, plugins.providers.litellm
        from core.app import create_app
        from core.config import Config
        from core.plugins import make_plugin_manager, provider_factories
        from core.providers import ModelSpec

        pm = make_plugin_manager()
        factories = provider_factories(pm)
        assert "litellm" in factories, sorted(factories)
        spec = ModelSpec("lite", "litellm", {"model": "openai/gpt-4o-mini"})
        factories["litellm"](spec, None)
        create_app(Config(), pm)
        assert "litellm" not in sys.modules
        assert "openai" not in sys.modules
        print("clean")
        """,
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "clean"


def test_open_imports_litellm_offline_and_quietly() -> None:
    """`open` sets LITELLM_LOCAL_MODEL_COST_MAP itself, so neither the import nor a call
    (mocked) tries the network; litellm's banners and debug output are off."""
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_LOCAL_MODEL_COST_MAP"}
    env.pop("LITELLM_LOG", None)
    done = run_python(
        """
        import asyncio, logging, os, socket, sys

        attempts = []

        def refuse(*args, **kwargs):
            attempts.append(args[:2])
            raise OSError("no network in this test")

        socket.getaddrinfo = refuse
        socket.create_connection = refuse
        socket.socket.connect = lambda self, address: refuse(address)
        socket.socket.connect_ex = lambda self, address: refuse(address)

        from core.providers import ModelCall, ModelSpec
        from plugins.providers.litellm import make_litellm

        options = {"model": "anthropic/claude-x", "mock_response": "Hi from a mock"}
        provider = make_litellm(ModelSpec("m", "litellm", options))

        async def main():
            await provider.open()
            assert "litellm" in sys.modules
            assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
            items = [item async for item in provider.stream(ModelCall([
                {"role": "user", "content": "hello"}
            ]))]
            await provider.aclose()
            return items

        items = asyncio.run(main())
        import litellm
        assert "".join(i for i in items if isinstance(i, str)) == "Hi from a mock", items
        assert litellm.suppress_debug_info is True
        assert logging.getLogger("LiteLLM").getEffectiveLevel() >= logging.ERROR
        assert attempts == [], attempts
        print("offline")
        """,
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "offline"


def test_a_litellm_model_without_litellm_installed_is_one_config_error(tmp_path: Path) -> None:
    """#16.8: `make serve` installs no litellm; a litellm model then says how to add it."""
    config = tmp_path / "chatbus.toml"
    config.write_text(
        'default_model = "claude"\n[models.claude]\nprovider = "litellm"\n'
        'model = "anthropic/claude-3-5-haiku-latest"\n[history.sqlite]\npath = "c.db"\n'
    )
    done = run_python(
        f"""
        import sys
        sys.modules["litellm"] = None  # as if not installed
        from core.cli import main
        sys.exit(main(["--config", {str(config)!r}, "chat", "hi"]))
        """,
        dict(os.environ),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr == (
        f"chatbus: configuration error: {config}: models.claude: provider litellm needs the"
        " litellm package, not installed here: .venv/bin/pip install -e '.[litellm]'\n"
    )


async def test_an_option_litellm_does_not_know_is_warned_of_with_what_it_may_mean(
    upstream: FakeUpstream, key: str, litellm: ModuleType
) -> None:
    """#16.6: `api_bse` would send the request to OpenAI's own URL: said at start-up."""
    provider = provider_for(upstream, api_bse="http://elsewhere", top_k=3, api_version="1")
    with structlog.testing.capture_logs() as logs:
        await provider.open()
    said = {line["option"]: line for line in logs if "option" in line}
    assert said["api_bse"] == {
        "event": "litellm does not know this option: it is sent as is",
        "option": "api_bse",
        "did_you_mean": "api_base",
        "log_level": "warning",
    }
    assert said["top_k"]["log_level"] == "info"  # a provider's own option, most likely
    assert set(said) == {"api_bse", "top_k"}  # api_version is litellm's


# --- the happy path and what the upstream receives ---------------------------------------


async def test_deltas_are_the_upstream_tokens_and_usage_is_reported(
    upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(tokens=["Hi", " there", ",", " friend", "!"])
    pieces, usages = await collect(provider_for(upstream))
    assert pieces == ["Hi", " there", ",", " friend", "!"]
    # The fake counts prompt tokens as whitespace-split words of every message: 3 + 3.
    assert usages == [Usage(prompt_tokens=6, completion_tokens=5)]


async def test_default_tokens_then_usage_last(upstream: FakeUpstream, key: str) -> None:
    items = [item async for item in provider_for(upstream).stream(ModelCall(MESSAGES))]
    stop = Finish("stop")
    assert items == [*DEFAULT_TOKENS, stop, Usage(prompt_tokens=6, completion_tokens=4)]


async def test_what_the_upstream_receives(upstream: FakeUpstream, key: str) -> None:
    provider = provider_for(upstream, top_p=0.9, seed=7, stop=["\n\n"])
    await collect(provider, ModelCall(messages=MESSAGES, temperature=0.3, max_tokens=50))
    assert len(upstream.received) == 1  # num_retries=0: litellm never retries on its own
    received = upstream.received[0]
    assert received.path == "/v1/chat/completions"
    body = received.body
    assert body["model"] == "fake-model"
    assert body["messages"] == MESSAGES
    assert body["temperature"] == 0.3
    assert body["max_tokens"] == 50
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["top_p"], body["seed"], body["stop"]) == (0.9, 7, ["\n\n"])  # passed through
    assert received.headers["Authorization"] == f"Bearer {key}"


async def test_max_tokens_none_is_not_sent(upstream: FakeUpstream, key: str) -> None:
    await collect(provider_for(upstream), ModelCall(messages=MESSAGES, max_tokens=None))
    body = upstream.received[0].body
    assert "max_tokens" not in body
    assert "max_completion_tokens" not in body
    assert "temperature" not in body  # absent means absent: the upstream's default applies


async def test_max_tokens_limits_the_answer(upstream: FakeUpstream, key: str) -> None:
    pieces, usages = await collect(
        provider_for(upstream), ModelCall(messages=MESSAGES, max_tokens=2)
    )
    assert pieces == list(DEFAULT_TOKENS[:2])
    assert usages == [Usage(prompt_tokens=6, completion_tokens=2)]


async def test_without_api_key_env_litellm_reads_its_own_variable(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-variable")
    await collect(provider_for(upstream, api_key_env=None))
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-from-openai-variable"


@pytest.mark.parametrize("value", [None, ""])
async def test_an_unset_key_variable_leaves_the_key_to_litellm(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    # api_key_env is optional: unset, litellm's own conventions apply (here OPENAI_API_KEY).
    if value is None:
        monkeypatch.delenv(KEY_VAR, raising=False)
    else:
        monkeypatch.setenv(KEY_VAR, value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-litellm-convention")
    await collect(provider_for(upstream))
    assert upstream.received[0].headers["Authorization"] == "Bearer sk-litellm-convention"


async def test_open_is_optional_and_cheap_once_imported(upstream: FakeUpstream, key: str) -> None:
    provider = provider_for(upstream)
    await provider.open()
    await provider.open()
    pieces, _ = await collect(provider)
    assert pieces == list(DEFAULT_TOKENS)
    await provider.aclose()


async def test_litellm_success_callbacks_still_run(
    upstream: FakeUpstream, key: str, litellm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without callbacks the answer ends at litellm's usage chunk (its success logging is
    skipped); with one configured, the stream is read to its end and the callback fed."""
    from litellm.integrations.custom_logger import CustomLogger

    logged = asyncio.Event()
    responses: list[Any] = []

    class Recorder(CustomLogger):
        async def async_log_success_event(
            self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
        ) -> None:
            responses.append(response_obj)
            logged.set()

    monkeypatch.setattr(litellm, "callbacks", [Recorder()])
    pieces, usages = await collect(provider_for(upstream))
    assert pieces == list(DEFAULT_TOKENS)
    assert usages == [Usage(prompt_tokens=6, completion_tokens=4)]
    async with asyncio.timeout(5):
        await logged.wait()
    assert responses[0].choices[0].message.content == "".join(DEFAULT_TOKENS)
    assert upstream.open_streams == 0


# --- HTTP status errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "error_class", "litellm_class"),
    [
        (401, "nope, sorry", AuthenticationFailed, "AuthenticationError"),
        (403, "nope, sorry", AuthenticationFailed, "APIError"),  # litellm: a plain APIError
        (404, "nope, sorry", BadRequest, "NotFoundError"),
        (422, "nope, sorry", BadRequest, "BadRequestError"),
        (429, "nope, sorry", RateLimited, "RateLimitError"),
        (400, "nope, sorry", BadRequest, "BadRequestError"),
        (
            400,
            "This model's maximum context length is 4096 tokens",
            ContextWindowExceeded,
            "ContextWindowExceededError",
        ),
        (500, "nope, sorry", UpstreamUnavailable, "InternalServerError"),
        (502, "nope, sorry", UpstreamUnavailable, "BadGatewayError"),
        (503, "nope, sorry", UpstreamUnavailable, "ServiceUnavailableError"),
        (504, "nope, sorry", UpstreamTimeout, "Timeout"),
    ],
)
async def test_status_errors_map_to_types(
    upstream: FakeUpstream,
    key: str,
    status: int,
    message: str,
    error_class: type[ProviderError],
    litellm_class: str,
) -> None:
    upstream.behaviour = Behaviour(fail_status=status, fail_message=message)
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is error_class
    assert pieces == []
    assert str(exc).startswith(f"{litellm_class} (")
    assert str(exc).endswith(message)
    assert len(upstream.received) == 1


async def test_rate_limited_carries_retry_after(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(fail_status=429, retry_after="17")
    exc, _ = await failure(provider_for(upstream))
    assert type(exc) is RateLimited
    assert exc.retry_after == "17"
    assert exc.retryable is True


async def test_rate_limited_without_retry_after(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(fail_status=429)
    exc, _ = await failure(provider_for(upstream))
    assert type(exc) is RateLimited
    assert exc.retry_after is None


# --- failures mid-stream and on the way ---------------------------------------------------


async def test_broken_connection_mid_stream_is_unavailable(
    upstream: FakeUpstream, key: str
) -> None:
    """litellm raises MidStreamFallbackError (a ServiceUnavailableError) wrapping an
    APIConnectionError: that is UpstreamUnavailable, after the pieces that came."""
    upstream.behaviour = Behaviour(break_after=2)
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is UpstreamUnavailable
    assert pieces == list(DEFAULT_TOKENS[:2])
    broke = "the answer broke off: APIConnectionError: OpenAIException - Connection error."
    assert str(exc) == broke


async def test_broken_connection_before_any_piece_is_unavailable(
    upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(break_after=0)
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is UpstreamUnavailable
    assert pieces == []


async def test_malformed_frame_is_malformed_response(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(malformed_after=1)
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is MalformedResponse
    assert pieces == [DEFAULT_TOKENS[0]]
    assert "not JSON" in str(exc)


async def test_random_bytes_are_malformed(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(raw_body=b"\x00\x01 garbage \xff\xfe\n\n", raw_type=None)
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is MalformedResponse  # not retried, as a broken connection would be
    assert pieces == []


def frame(content: str, finish: str | None = None) -> bytes:
    delta = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + json.dumps(delta).encode() + b"\n\n"


async def test_a_line_that_never_ends_is_refused_at_the_limit(
    upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(long_line=64 * 1024 * 1024)  # 64 MiB, no newline
    exc, pieces = await failure(provider_for(upstream))  # the default limit: 1 MiB
    assert type(exc) is MalformedResponse
    assert str(exc) == "the upstream sent an event longer than 1048576 bytes"
    assert pieces == [DEFAULT_TOKENS[0]]
    assert await upstream.wait_for_close(5.0)  # it stopped reading: the upstream is let go


async def test_an_event_that_never_ends_is_refused_at_the_limit(
    upstream: FakeUpstream, key: str
) -> None:
    # Short lines, but no blank line: the OpenAI SDK would hold them all as one event.
    lines = b"data: x\n" * 200_000  # 1.6 MB
    upstream.behaviour = Behaviour(raw_body=frame("a") + lines, raw_type="text/event-stream")
    exc, pieces = await failure(provider_for(upstream))
    assert str(exc) == "the upstream sent an event longer than 1048576 bytes"
    assert pieces == ["a"]


async def test_the_event_limit_is_each_models_own(upstream: FakeUpstream, key: str) -> None:
    body = frame("x" * 5000, finish="stop") + b"data: [DONE]\n\n"  # a 5 kB event
    upstream.behaviour = Behaviour(raw_body=body, raw_type="text/event-stream")
    small, large = provider_for(upstream, max_event_bytes=4096), provider_for(upstream)
    exc, _ = await failure(small)
    assert str(exc) == "the upstream sent an event longer than 4096 bytes"
    pieces, _ = await collect(large)
    assert pieces == ["x" * 5000]
    exc, _ = await failure(small)  # the same litellm client, the small model's limit again
    assert str(exc) == "the upstream sent an event longer than 4096 bytes"


async def test_events_split_across_reads_are_counted_from_their_end(
    upstream: FakeUpstream, key: str
) -> None:
    # Many events, each under the limit, the whole far over it: nothing is refused.
    tokens = [f"{n:04}" + "y" * 996 for n in range(300)]  # 300 kB
    upstream.behaviour = Behaviour(tokens=tokens, one_write=True)
    pieces, _ = await collect(provider_for(upstream, max_event_bytes=2048))
    assert pieces == tokens


# Strings and floats litellm's own validation refuses (the stream then fails inside litellm);
# negatives and huge numbers it lets through, and chatbus drops. ("7" and True litellm
# turns into 7 and 1 before chatbus sees them.)
@pytest.mark.parametrize("bad", ["x", 1e25, 1.5, -1, 2**60])
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
async def test_invalid_token_counts_are_dropped(upstream: FakeUpstream, key: str, bad: Any) -> None:
    values = {"prompt_tokens": bad, "completion_tokens": 4, "total_tokens": 9}
    upstream.behaviour = Behaviour(usage_values=values)
    pieces, usages = await collect(provider_for(upstream))
    assert pieces == list(DEFAULT_TOKENS)  # the answer stands
    assert usages in ([], [Usage(prompt_tokens=None, completion_tokens=4)])


async def test_error_event_mid_stream_carries_the_message(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(error_event_after=2, fail_message="the GPU caught fire")
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is UpstreamUnavailable
    assert "the GPU caught fire" in str(exc)
    assert pieces == list(DEFAULT_TOKENS[:2])


async def test_context_error_event_mid_stream(upstream: FakeUpstream, key: str) -> None:
    message = "This model's maximum context length is 4096 tokens"
    upstream.behaviour = Behaviour(error_event_after=0, fail_message=message)
    exc, _ = await failure(provider_for(upstream))
    assert type(exc) is ContextWindowExceeded


async def test_connection_refused_is_unavailable(key: str) -> None:
    provider = make(
        model="openai/fake-model",
        api_base=f"http://127.0.0.1:{closed_port()}/v1",
        api_key_env=KEY_VAR,
        timeout=2,
    )
    exc, _ = await failure(provider)
    assert type(exc) is UpstreamUnavailable
    assert "Connection error" in str(exc)


async def test_slow_first_token_is_a_timeout(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(first_delay=2.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    exc, _ = await failure(provider_for(upstream, timeout=0.3))
    assert type(exc) is UpstreamTimeout
    assert loop.time() - started < 1.5


async def test_silence_mid_stream_is_a_timeout(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(delay=2.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    exc, pieces = await failure(provider_for(upstream, timeout=0.3))
    assert type(exc) is UpstreamTimeout
    assert pieces == [DEFAULT_TOKENS[0]]
    assert loop.time() - started < 1.5


# --- the key never leaks ------------------------------------------------------------------


async def test_key_echoed_by_the_upstream_is_redacted(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(fail_status=401, fail_message=f"bad key {key}")
    exc, _ = await failure(provider_for(upstream))
    assert type(exc) is AuthenticationFailed
    assert str(exc) == "AuthenticationError (401): OpenAIException - bad key [redacted]"
    assert key not in repr(exc)
    assert key not in "".join(traceback.format_exception(exc))


async def test_key_echoed_mid_stream_is_redacted(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(error_event_after=1, fail_message=f"key {key} revoked")
    exc, _ = await failure(provider_for(upstream))
    assert key not in str(exc)
    assert "key [redacted] revoked" in str(exc)
    assert key not in "".join(traceback.format_exception(exc))


async def test_redaction_keeps_retry_after(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour = Behaviour(fail_status=429, fail_message=f"slow {key}", retry_after="9")
    exc, _ = await failure(provider_for(upstream))
    assert type(exc) is RateLimited
    assert key not in str(exc)
    assert exc.retry_after == "9"


# --- cancellation -------------------------------------------------------------------------


async def test_closing_the_stream_early_closes_the_upstream_connection(
    upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(delay=0.5)
    stream = provider_for(upstream).stream(ModelCall(MESSAGES))
    first = await anext(stream)
    second = await anext(stream)
    assert [first, second] == list(DEFAULT_TOKENS[:2])
    await stream.aclose()
    assert await upstream.wait_for_close(1.0) is True
    assert upstream.closed_early == 1


async def test_cancelling_the_consumer_closes_the_upstream_connection(
    upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(delay=0.5)
    got: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for item in provider_for(upstream).stream(ModelCall(MESSAGES)):
            got.append(item)  # type: ignore[arg-type]
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await upstream.wait_for_close(1.0) is True
    assert got == [DEFAULT_TOKENS[0]]


async def test_cancelling_before_the_first_piece_closes_the_upstream_request(
    upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(first_delay=1.0)

    async def consume() -> None:
        async for _ in provider_for(upstream).stream(ModelCall(MESSAGES)):
            pass

    task = asyncio.create_task(consume())
    await wait_until(lambda: upstream.received, "the request at the upstream, waiting")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await upstream.wait_for_close(1.0) is True


# --- other providers' errors, through litellm's mock_response (offline) ------------------

Mock = Callable[[ModuleType], Any]


def _response(status: int) -> Any:
    import httpx  # litellm's dependency, here once litellm is

    return httpx.Response(status, request=httpx.Request("POST", "https://api.anthropic.com"))


ANTHROPIC = {"llm_provider": "anthropic", "model": "claude-x"}
MOCK_ERRORS: list[tuple[str, Mock, type[ProviderError]]] = [
    (
        "AuthenticationError",
        lambda e: e.AuthenticationError(message="invalid x-api-key", **ANTHROPIC),
        AuthenticationFailed,
    ),
    (
        "PermissionDeniedError",
        lambda e: e.PermissionDeniedError(message="no", response=_response(403), **ANTHROPIC),
        AuthenticationFailed,
    ),
    ("RateLimitError", lambda e: e.RateLimitError(message="slow", **ANTHROPIC), RateLimited),
    (
        "ContextWindowExceededError",
        lambda e: e.ContextWindowExceededError(message="prompt is too long", **ANTHROPIC),
        ContextWindowExceeded,
    ),
    ("BadRequestError", lambda e: e.BadRequestError(message="bad", **ANTHROPIC), BadRequest),
    ("NotFoundError", lambda e: e.NotFoundError(message="no model", **ANTHROPIC), BadRequest),
    (
        "UnprocessableEntityError",
        lambda e: e.UnprocessableEntityError(message="x", response=_response(422), **ANTHROPIC),
        BadRequest,
    ),
    ("Timeout", lambda e: e.Timeout(message="slow", **ANTHROPIC), UpstreamTimeout),
    (
        "APIConnectionError",
        lambda e: e.APIConnectionError(message="refused", **ANTHROPIC),
        UpstreamUnavailable,
    ),
    (
        "ServiceUnavailableError",
        lambda e: e.ServiceUnavailableError(message="down", **ANTHROPIC),
        UpstreamUnavailable,
    ),
    (
        "InternalServerError",
        lambda e: e.InternalServerError(message="oops", **ANTHROPIC),
        UpstreamUnavailable,
    ),
    (
        "APIError 529",
        lambda e: e.APIError(status_code=529, message="overloaded", **ANTHROPIC),
        UpstreamUnavailable,
    ),
    (
        "APIError 403",
        lambda e: e.APIError(status_code=403, message="forbidden", **ANTHROPIC),
        AuthenticationFailed,
    ),
    (
        "APIError 418",
        lambda e: e.APIError(status_code=418, message="teapot", **ANTHROPIC),
        ProviderError,
    ),
    # The documented string forms.
    ("litellm.RateLimitError", lambda e: "litellm.RateLimitError", RateLimited),
    (
        "litellm.ContextWindowExceededError",
        lambda e: "litellm.ContextWindowExceededError",
        ContextWindowExceeded,
    ),
    ("litellm.InternalServerError", lambda e: "litellm.InternalServerError", UpstreamUnavailable),
    # Raised mid-stream (a 529 MockException inside a MidStreamFallbackError).
    ("mock_streaming_error", lambda e: "Exception: mock_streaming_error", UpstreamUnavailable),
    # Not one of litellm's: litellm wraps it (InternalServerError).
    ("ValueError", lambda e: ValueError("plain"), UpstreamUnavailable),
]


@pytest.mark.parametrize(
    ("mock", "error_class"),
    [pytest.param(mock, cls, id=name) for name, mock, cls in MOCK_ERRORS],
)
async def test_other_providers_errors_map_to_types(
    litellm: ModuleType, mock: Mock, error_class: type[ProviderError]
) -> None:
    provider = make(model="anthropic/claude-x", mock_response=mock(litellm.exceptions))
    exc, _ = await failure(provider)
    assert type(exc) is error_class


async def test_mock_rate_limit_has_no_retry_after(litellm: ModuleType) -> None:
    exc, _ = await failure(make(model="anthropic/claude-x", mock_response="litellm.RateLimitError"))
    assert type(exc) is RateLimited
    assert exc.retry_after is None
    assert str(exc) == "RateLimitError (429): this is a mock rate limit error"


async def test_mock_text_streams_with_usage(litellm: ModuleType) -> None:
    provider = make(model="anthropic/claude-x", mock_response="Hello from a mock answer")
    pieces, usages = await collect(provider)
    assert "".join(pieces) == "Hello from a mock answer"
    assert len(usages) == 1
    assert usages[0].completion_tokens and usages[0].prompt_tokens


# --- configuration ------------------------------------------------------------------------


def test_model_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        make(api_base="http://127.0.0.1:1/v1")
    errors = info.value.errors()
    assert [(e["loc"], e["type"]) for e in errors] == [(("model",), "missing")]


def test_api_key_option_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        make(model="openai/gpt-4o-mini", api_key="sk-in-the-file")
    errors = info.value.errors()
    assert len(errors) == 1
    assert "keys never go in the file" in errors[0]["msg"]
    assert "api_key_env" in errors[0]["msg"]
    problem = first_problem(info.value, "models.m")
    assert problem == (
        "models.m: api_key: keys never go in the file; name an environment variable in"
        " api_key_env instead"
    )
    assert "sk-in-the-file" not in problem


@pytest.mark.parametrize(
    "name", ["messages", "temperature", "max_tokens", "stream", "stream_options", "num_retries"]
)
def test_keys_chatbus_sets_are_refused(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        make(model="openai/gpt-4o-mini", **{name: 1})
    assert f"{name}: not an option here" in first_problem(info.value, "models.m")


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValidationError) as info:
        make(model="openai/gpt-4o-mini", timeout=0)
    assert [e["loc"] for e in info.value.errors()] == [("timeout",)]


def test_other_keys_are_passed_through() -> None:
    provider = make(model="azure/gpt", api_version="2024-06-01", top_p=0.5, timeout=30)
    assert provider.options.extra == {"api_version": "2024-06-01", "top_p": 0.5}
    assert provider.options.timeout == 30


# --- through chatbus ----------------------------------------------------------------------


def lite(upstream: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "litellm",
        "model": "openai/fake-model",
        "api_base": upstream.base_url,
        "api_key_env": KEY_VAR,
        "timeout": 5,
        **extra,
    }


async def test_chat_through_chatbus_is_stored_with_usage(
    start_chatbus: StartChatbus, upstream: FakeUpstream, key: str
) -> None:
    chatbus = await start_chatbus(models={"lite": lite(upstream)})
    stream = await chatbus.chat(query="Hi there", model_name="lite", temperature=0.2)
    assert stream.status == 200
    assert stream.text == "".join(DEFAULT_TOKENS)
    assert [frame["text"] for frame in stream.frames] == list(DEFAULT_TOKENS)
    (message_id,) = stream.message_ids
    body = upstream.received[-1].body
    assert body["messages"] == [{"role": "user", "content": "Hi there"}]
    assert body["temperature"] == 0.2
    assert upstream.received[-1].headers["Authorization"] == f"Bearer {key}"
    completed = await chatbus.events.wait_for("chat_completed")
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert record.status is Status.COMPLETED
    assert record.model == "lite"
    assert record.response == "".join(DEFAULT_TOKENS)
    assert record.usage == Usage(prompt_tokens=2, completion_tokens=4)
    assert completed[0].usage == record.usage  # type: ignore[attr-defined]


async def test_answer_limits_apply_through_litellm(
    start_chatbus: StartChatbus, upstream: FakeUpstream, key: str
) -> None:
    """The size and time limits are chatbus's own (core/turn.py): litellm's models have them."""
    words = [f"w{i} " for i in range(10)]  # litellm refuses 100 chunks alike in a row
    upstream.behaviour = Behaviour(endless=True, tokens=words)
    models = {
        "lite": lite(upstream, max_answer_chars=1000),
        "slow": lite(upstream, answer_timeout_seconds=0.5),
    }
    chatbus = await start_chatbus(models=models)
    too_long = await chatbus.chat(query="Hi", model_name="lite")
    assert too_long.frames[-1]["error"]["type"] == "answer_too_long"
    assert too_long.text == ("".join(words) * 34)[:999]  # 333 pieces: the next would pass
    upstream.behaviour = Behaviour(endless=True, tokens=words, delay=0.05)
    too_slow = await chatbus.chat(query="Hi", model_name="slow")
    assert too_slow.frames[-1]["error"]["type"] == "upstream_timeout"
    for stream, error in ((too_long, "answer_too_long"), (too_slow, "upstream_timeout")):
        (message_id,) = stream.message_ids
        record = await chatbus.store.get_message("default", message_id)
        assert record is not None
        assert (record.status, record.error, record.response) == (
            Status.FAILED,
            error,
            stream.text,
        )
    assert len(upstream.received) == 2  # neither was retried


async def test_upstream_failure_through_chatbus(
    start_chatbus: StartChatbus, upstream: FakeUpstream, key: str
) -> None:
    upstream.behaviour = Behaviour(fail_status=401, fail_message=f"bad key {key}")
    chatbus = await start_chatbus(models={"lite": lite(upstream)})
    stream = await chatbus.chat(query="Hi", model_name="lite")
    error = stream.frames[-1]["error"]
    assert error["type"] == "authentication_failed"
    assert key not in error["message"]
    (message_id,) = stream.message_ids
    record = await chatbus.store.get_message("default", message_id)
    assert record is not None
    assert record.status is Status.FAILED
    assert len(upstream.received) == 1  # not retryable


@pytest.mark.parametrize("content_type", ["text/html", "application/json", None])
async def test_a_200_that_is_no_event_stream_is_malformed(
    upstream: FakeUpstream, key: str, content_type: str | None
) -> None:
    body = b"<html><body><h1>Welcome to nginx!</h1></body></html>\n"
    upstream.behaviour = Behaviour(raw_body=body, raw_type=content_type)
    exc, pieces = await failure(provider_for(upstream))
    assert type(exc) is MalformedResponse  # not an empty answer, and not retried
    assert pieces == []


# Provider contract v2: reasoning, tool calls, finish reasons, parameters (#14.2)


async def test_tool_calls_without_text_are_an_answer(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour.tokens = []
    upstream.behaviour.tool_calls = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    provider = provider_for(upstream)
    items = [item async for item in provider.stream(ModelCall(MESSAGES, tools=[{"x": 1}]))]
    calls = [item for item in items if isinstance(item, ToolCallDelta)]
    assert {(c.index, c.id, c.name) for c in calls if c.id} == {(0, "call_fake0", "get_weather")}
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}'
    assert Finish("tool_calls") in items
    assert upstream.received[-1].body["tools"] == [{"x": 1}]


async def test_reasoning_content_is_relayed(upstream: FakeUpstream, key: str) -> None:
    upstream.behaviour.reasoning = ["Hm", "m."]
    items = [item async for item in provider_for(upstream).stream(ModelCall(MESSAGES))]
    assert "".join(i.text for i in items if isinstance(i, Reasoning)) == "Hmm."
    assert "".join(i for i in items if isinstance(i, str)) == "".join(DEFAULT_TOKENS)


async def test_the_finish_reason_length_is_relayed(upstream: FakeUpstream, key: str) -> None:
    items = [
        item async for item in provider_for(upstream).stream(ModelCall(MESSAGES, max_tokens=2))
    ]
    assert Finish("length") in items
