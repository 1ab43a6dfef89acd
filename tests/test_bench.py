"""The benchmark runs end to end with tiny counts; it is a tool, so no timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


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
    assert "## Targets" in text
    assert text in done.stdout  # the same table is printed

    results = orjson.loads(out.with_suffix(".json").read_bytes())
    assert results["quick"] is True
    assert results["errors_total"] == 0
    for path in ("direct", "chatbus_openai_compat"):
        assert results["paths"][path]["seq"]["errors"]["total"] == 0
        assert results["paths"][path]["rate"]["errors"]["total"] == 0
        assert results["slow"][path]["errors"]["total"] == 0
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
