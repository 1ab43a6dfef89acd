"""The store benchmark (bench/store.py) runs end to end in its quick mode (10k turns, both
stores); it is a tool, so no timing is asserted, only that every figure was measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


def test_quick_store_bench_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "store.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.store", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    text = out.read_text()
    assert text in done.stdout  # the same table is printed
    assert "| SQLite | 10,000 | 3,333 (833) |" in text
    assert "| MongoDB (SecantusDB) | 10,000 | 3,333 (833) |" in text
    assert "## Targets" in text and "bulk insert through the store's own schema" in text

    results = orjson.loads(out.with_suffix(".json").read_bytes())
    assert results["quick"] is True
    assert results["errors_total"] == 0
    assert [(row["store"], row["turns"]) for row in results["rows"]] == [
        ("sqlite", 10_000),
        ("mongo", 10_000),
    ]
    for row in results["rows"]:
        for part in ("listing", "cursor_pages", "chat_alone", "chat_under_load"):
            assert row[part]["latency_ms"]["count"] > 0, part  # fewer if a series hit its cap
            assert row[part]["latency_ms"]["p50"] > 0
        assert row["load"]["listings_per_s"] > 0
    assert [target["met"] is not None for target in results["targets"]] == [True, True]
