"""The results as markdown: the side-by-side table, the slow streams, the targets."""

from __future__ import annotations

from typing import Any

LITELLM_NOTE = "not available yet (issue 4: litellm provider)"
DIRECT, CHATBUS = "direct", "chatbus_openai_compat"
NAMES = {DIRECT: "direct (floor)", CHATBUS: "chatbus openai_compat"}


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def mb(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f} MB"


def errors_of(run: dict[str, Any]) -> int:
    return int(run["errors"]["total"]) + int(run.get("warmup_errors", {}).get("total", 0))


def added_p50(r: dict[str, Any]) -> float | None:
    direct, chatbus = (r["paths"][p]["seq"]["latency_ms"]["p50"] for p in (DIRECT, CHATBUS))
    return None if direct is None or chatbus is None else chatbus - direct


def rate_ratio(r: dict[str, Any]) -> float:
    floor = r["paths"][DIRECT]["rate"]["chats_per_s"]
    return r["paths"][CHATBUS]["rate"]["chats_per_s"] / floor if floor else 0.0


def gap_overhead(slow: dict[str, Any], gap_ms: float) -> float | None:
    p99 = slow["gap_ms"]["p99"]
    return None if p99 is None else p99 - gap_ms


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure DESIGN.md asks for on the openai_compat path: measured, met or not."""
    added = added_p50(r)
    ratio = rate_ratio(r)
    slow = r["slow"][CHATBUS]
    overhead = gap_overhead(slow, r["counts"]["slow_gap_ms"])
    floor_overhead = gap_overhead(r["slow"][DIRECT], r["counts"]["slow_gap_ms"])
    added_gap = None if None in (overhead, floor_overhead) else overhead - floor_overhead
    slow_errors = errors_of(slow)
    startup = r["startup"]["seconds"]
    total = r["errors_total"]
    n = r["counts"]["slow_streams"]
    return [
        {
            "target": "openai_compat chats/s at c=100 ≥ 50% of the floor",
            "measured": f"{ratio:.0%}",
            "met": ratio >= 0.5,
        },
        {
            "target": "openai_compat added p50 latency < 1 ms",
            "measured": ms(added),
            "met": added is not None and added < 1.0,
        },
        {"target": "0 errors (every run above)", "measured": str(total), "met": total == 0},
        {
            # Side by side: what chatbus adds to the p99 gap the same client sees direct.
            "target": "1,000 slow streams: 0 errors, p99 gap over the floor's < 5 ms",
            "measured": f"{n} streams ({slow['max_open']} open at once), {slow_errors} errors,"
            f" p99 gap {ms(slow['gap_ms']['p99'])} vs floor"
            f" {ms(r['slow'][DIRECT]['gap_ms']['p99'])}: +{ms(added_gap)}",
            "met": n >= 1000
            and slow["all_open_at_once"]
            and slow_errors == 0
            and added_gap is not None
            and added_gap < 5.0,
        },
        {
            "target": "start-up to first answer < 1 s",
            "measured": f"{startup:.2f} s",
            "met": startup < 1.0,
        },
    ]


def markdown(r: dict[str, Any]) -> str:
    c, m = r["counts"], r["machine"]
    lines = [
        f"# chatbus benchmark{' (quick)' if r['quick'] else ''}",
        "",
        f"- date: {r['date']}",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Linux {m['kernel']}",
        f"- commit: {r['commit']}",
        f"- counts: sequential {c['seq_count']} answers after {c['seq_warmup']} warm-up;"
        f" rate {c['rate_count']} answers at concurrency {c['concurrency']};"
        f" {c['tokens']} tokens an answer; slow: {c['slow_streams']} streams of"
        f" {c['slow_tokens']} tokens, {c['slow_gap_ms']:.0f} ms apart",
        f"- one machine, loopback: fake upstream, chatbus and the load generator are separate"
        f" processes sharing the {m['nproc']} CPUs; history store on (SQLite)",
        "",
        *_main_table(r),
        "",
        f"## Slow streams: {c['slow_streams']} at once, a token every {c['slow_gap_ms']:.0f} ms",
        "",
        *_slow_table(r),
        "",
        "## Targets",
        "",
        *(["Quick run: tiny counts, so these are indicative only.", ""] if r["quick"] else []),
        "| target | measured | result |",
        "|---|---|---|",
        *(
            f"| {t['target']} | {t['measured']} | {'met' if t['met'] else 'NOT MET'} |"
            for t in r["targets"]
        ),
        "",
        "## Notes",
        "",
        *_notes(r),
        "",
    ]
    return "\n".join(lines)


def _main_table(r: dict[str, Any]) -> list[str]:
    c = r["counts"]
    rows = [
        f"| path | seq p50 | seq p99 | added p50 | chats/s (c={c['concurrency']}) | vs floor"
        " | errors | chatbus RSS rest | chatbus RSS peak | start-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    floor = r["paths"][DIRECT]["rate"]["chats_per_s"]
    startup = f"{r['startup']['seconds']:.2f} s"
    for key in (DIRECT, CHATBUS):
        path = r["paths"][key]
        seq, rate = path["seq"]["latency_ms"], path["rate"]
        errors = errors_of(path["seq"]) + errors_of(rate)
        chatbus = key == CHATBUS
        rows.append(
            f"| {NAMES[key]} | {ms(seq['p50'])} | {ms(seq['p99'])}"
            f" | {ms(added_p50(r)) if chatbus else '—'}"
            f" | {rate['chats_per_s']:.0f} | {rate['chats_per_s'] / floor:.0%}"
            f" | {errors} | {mb(r['rss_kb']['rest']) if chatbus else '—'}"
            f" | {mb(path.get('rss_peak_kb')) if chatbus else '—'}"
            f" | {startup if chatbus else '—'} |"
        )
    rows.append(f"| chatbus litellm | {LITELLM_NOTE} | — | — | — | — | — | — | — | — |")
    return rows


def _slow_table(r: dict[str, Any]) -> list[str]:
    gap = r["counts"]["slow_gap_ms"]
    rows = [
        "| path | errors | open at once | time to open all | gap p50 | gap p99 | gap max"
        f" | p99 overhead vs {gap:.0f} ms | chatbus RSS all open | RSS per open stream |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in (DIRECT, CHATBUS):
        s = r["slow"][key]
        chatbus = key == CHATBUS
        per_stream = s.get("rss_per_stream_kb")
        per_stream_text = f"{per_stream:.1f} KiB" if chatbus and per_stream is not None else "—"
        rows.append(
            f"| {NAMES[key]} | {errors_of(s)} | {s['max_open']}/{s['count']}"
            f" | {s['open_all_s']:.2f} s | {ms(s['gap_ms']['p50'])} | {ms(s['gap_ms']['p99'])}"
            f" | {ms(s['gap_ms']['max'])} | {ms(gap_overhead(s, gap))}"
            f" | {mb(s.get('rss_open_kb')) if chatbus else '—'}"
            f" | {per_stream_text} |"
        )
    rows.append(f"| chatbus litellm | {LITELLM_NOTE} | — | — | — | — | — | — | — | — |")
    return rows


def _notes(r: dict[str, Any]) -> list[str]:
    direct, chatbus = r["paths"][DIRECT], r["paths"][CHATBUS]
    slow = r["slow"][CHATBUS]
    notes = [
        f"- CPU per answer at c={r['counts']['concurrency']}: chatbus"
        f" {ms(chatbus['cpu_ms_per_chat'].get('chatbus'))}, upstream"
        f" {ms(chatbus['cpu_ms_per_chat'].get('upstream'))} (direct:"
        f" {ms(direct['cpu_ms_per_chat'].get('upstream'))}), load generator"
        f" {ms(chatbus['cpu_ms_per_chat'].get('client'))} (direct:"
        f" {ms(direct['cpu_ms_per_chat'].get('client'))})",
        f"- latency under load at c={r['counts']['concurrency']} (p50 / p99): direct"
        f" {ms(direct['rate']['latency_ms']['p50'])} / {ms(direct['rate']['latency_ms']['p99'])},"
        f" chatbus {ms(chatbus['rate']['latency_ms']['p50'])}"
        f" / {ms(chatbus['rate']['latency_ms']['p99'])}",
        f"- CPUs busy (of {r['machine']['nproc']}; sampled every 100 ms): at"
        f" c={r['counts']['concurrency']} {_cores(direct)} direct, {_cores(chatbus)} via"
        f" chatbus; slow streams, all open: {_cores(r['slow'][DIRECT])} direct,"
        f" {_cores(slow)} via chatbus; the load generator is not included",
        f"- chatbus RSS just before the slow streams {mb(slow.get('rss_rest_kb'))}; per open"
        " stream = (RSS with all open - that) / streams",
        "- gaps are measured at the client between consecutive content frames, only once every"
        " stream is open; the direct row is the floor for the same machine and client",
        "- the load generator runs with its garbage collector off, so its own pauses are not"
        " charged to either path; the upstream and chatbus run as they are",
    ]
    for key, label in ((DIRECT, "direct"), (CHATBUS, "chatbus")):
        for run in (r["paths"][key]["seq"], r["paths"][key]["rate"], r["slow"][key]):
            for example in run["errors"]["examples"][:2]:
                notes.append(f"- error ({label}): `{example}`")
    return notes


def _cores(run: dict[str, Any]) -> str:
    cores = run.get("cpu_cores") or {}
    if not cores:
        return "(too short to sample)"
    return "(" + ", ".join(f"{name} {value:.2f}" for name, value in cores.items()) + ")"
