"""The benchmark runs end to end with tiny counts; it is a tool, so no timing is asserted.
Its client's reading of each path is checked against a real chatbus and fake upstream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.load import BadAnswer, Target, chat
from chatbus.testing.fake_upstream import FakeUpstream
from tests.conftest import Chatbus

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("direct", "chatbus:fake", "chatbus-v1:fake")  # the upstream, /chat/chat, /v1
LIMITS = aiohttp.ClientTimeout(total=30)


def target(kind: str, chatbus: Chatbus, upstream: FakeUpstream, tokens: int) -> Target:
    return Target.of(kind, upstream.base_url if kind == "direct" else chatbus.url, tokens)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_client_counts_the_content_frames_of_each_path(
    chatbus: Chatbus, upstream: FakeUpstream, kind: str
) -> None:
    upstream.behaviour.token_count = 20  # the bench's fast upstream
    async with aiohttp.ClientSession() as session:
        stamps: list[float] = []
        await chat(session, target(kind, chatbus, upstream, 20), LIMITS, stamps)
        assert len(stamps) == 20  # /v1's opening role chunk (content "") is not one
        with pytest.raises(BadAnswer, match="20 content frames, expected 21"):
            await chat(session, target(kind, chatbus, upstream, 21), LIMITS)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_error_frame_is_a_bad_answer_on_each_path(
    chatbus: Chatbus, upstream: FakeUpstream, kind: str
) -> None:
    upstream.behaviour.token_count = 20
    upstream.behaviour.error_event_after = 5  # after deltas: chatbus ends with an error frame
    async with aiohttp.ClientSession() as session:
        with pytest.raises(BadAnswer, match="error frame"):
            await chat(session, target(kind, chatbus, upstream, 20), LIMITS)


def test_quick_bench_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "r.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    names = (
        "direct (floor)",
        "chatbus openai_compat",
        "chatbus openai_compat via /v1/chat/completions",
        "litellm direct in-process (litellm floor)",
        "litellm direct, read to the usage as chatbus does",
        "chatbus litellm",
    )
    for path in names:
        assert any(row.startswith(f"| {path} |") for row in rows), path
    assert "not available yet" not in text
    assert "litellm: chatbus adds < 10% to calling litellm directly" in text
    assert "start-up with a litellm model configured" in text
    assert "## Slow streams" in text
    slow_rows = text.split("## Slow streams", 1)[1].split("## Targets", 1)[0]
    assert "| chatbus openai_compat via /v1/chat/completions |" in slow_rows
    # Both routes side by side, and /v1's figures among the targets as information only.
    assert (
        "| figure | /chat/chat (a write a frame) | /v1/chat/completions (bursts joined) |" in text
    )
    assert "| paired: median of /v1 ÷ /chat/chat, round by round | — | " in text
    assert "(/v1/chat/completions; information, not a target) |" in text
    assert "| information |" in text
    assert "## Targets" in text
    assert text in done.stdout  # the same table is printed
    # /chat/chat's chats/s at concurrency 100 with one process and with two workers.
    workers = text.split("## Workers: /chat/chat at concurrency 100", 1)[1].split("##", 1)[0]
    assert [row.split(" | ")[0] for row in workers.splitlines() if row[:3] in ("| 1", "| 2")] == [
        "| 1",
        "| 2",
    ]

    results = orjson.loads(out.with_suffix(".json").read_bytes())
    assert results["quick"] is True
    assert results["errors_total"] == 0
    for path in ("direct", "chatbus_openai_compat", "chatbus_v1"):
        assert results["paths"][path]["seq"]["errors"]["total"] == 0
        assert results["paths"][path]["rate"]["errors"]["total"] == 0
        assert results["paths"][path]["rate"]["chats_per_s"] > 0
        assert results["slow"][path]["errors"]["total"] == 0
        assert results["slow"][path]["all_open_at_once"]
    assert results["paths"]["chatbus_v1"]["cpu_ms_per_chat"]["client"] > 0
    assert results["workers"]["count"] == 2
    assert results["workers"]["rate"]["errors"]["total"] == 0
    assert results["workers"]["rate"]["chats_per_s"] > 0
    assert results["workers"]["cpu_ms_per_chat"]["chatbus"] > 0  # the workers', summed
    # direct, /chat/chat and /v1 took turns in one sequential run: /v1 is paired with both.
    v1 = results["paths"]["chatbus_v1"]["seq"]
    assert v1["count"] == results["paths"]["direct"]["seq"]["count"]
    assert v1["ratio_to"]["direct"] == v1["ratio_to_first"] > 0
    assert v1["ratio_to"]["chatbus_openai_compat"] > 0
    assert "chatbus_v1" in results["paths"]["chatbus_openai_compat"]["seq"]["ratio_to"]
    # The existing targets judge /chat/chat only: /v1's rows are information.
    judged = [t for t in results["targets"] if t["met"] is not None]
    assert judged and not any("/v1/chat/completions;" in t["target"] for t in judged)
    assert sum(t["met"] is None for t in results["targets"]) == 4
    for path in ("litellm_direct", "litellm_at_usage", "chatbus_litellm"):
        assert results["paths"][path]["seq"]["errors"]["total"] == 0
        assert results["paths"][path]["rate"]["errors"]["total"] == 0
        assert results["paths"][path]["seq"]["latency_ms"]["p50"] > 0
    # Sequential runs take turns: each chatbus path is also judged round by round on its floor.
    for floor, path in (("direct", "chatbus_openai_compat"), ("litellm_direct", "chatbus_litellm")):
        assert results["paths"][floor]["seq"]["ratio_to_first"] is None
        assert results["paths"][path]["seq"]["ratio_to_first"] > 0
        assert results["paths"][path]["seq"]["count"] == results["paths"][floor]["seq"]["count"]
    # With a litellm model, start-up includes importing litellm; without, it does not.
    assert results["startup"]["litellm_seconds"] > results["startup"]["seconds"]
