"""The results as markdown: the side-by-side table, the slow streams, the targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

DIRECT, CHATBUS = "direct", "chatbus_openai_compat"  # chatbus through /chat/chat
CHATBUS_V1 = "chatbus_v1"  # the same model through /v1/chat/completions: shown, not judged
LITELLM_DIRECT, CHATBUS_LITELLM = "litellm_direct", "chatbus_litellm"
LITELLM_AT_USAGE = "litellm_at_usage"  # litellm read as chatbus reads it: up to the usage
NAMES = {
    DIRECT: "direct (floor)",
    CHATBUS: "chatbus openai_compat",
    CHATBUS_V1: "chatbus openai_compat via /v1/chat/completions",
    LITELLM_DIRECT: "litellm direct in-process (litellm floor)",
    LITELLM_AT_USAGE: "litellm direct, read to the usage as chatbus does",
    CHATBUS_LITELLM: "chatbus litellm",
}
# each chatbus path and its floor
FLOORS = {CHATBUS: DIRECT, CHATBUS_V1: DIRECT, CHATBUS_LITELLM: LITELLM_DIRECT}
ROUTES = {CHATBUS: "/chat/chat", CHATBUS_V1: "/v1/chat/completions"}  # one model, two routes


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} ms"


def mb(kib: float | None) -> str:
    return "—" if kib is None else f"{kib / 1024:.1f} MB"


def errors_of(run: dict[str, Any]) -> int:
    return int(run["errors"]["total"]) + int(run.get("warmup_errors", {}).get("total", 0))


def path_errors(r: dict[str, Any], path: str) -> int:
    """Every failed answer of one path: sequential, rate and (if it had them) slow streams."""
    runs = [r["paths"][path]["seq"], r["paths"][path]["rate"]]
    if path in r["slow"]:
        runs.append(r["slow"][path])
    return sum(errors_of(run) for run in runs)


def added_p50(r: dict[str, Any], path: str = CHATBUS, floor: str | None = None) -> float | None:
    """What chatbus adds to its floor's sequential p50, in ms."""
    keys = (floor or FLOORS[path], path)
    base, chatbus = (r["paths"][p]["seq"]["latency_ms"]["p50"] for p in keys)
    return None if base is None or chatbus is None else chatbus - base


def added_share(
    r: dict[str, Any], path: str = CHATBUS_LITELLM, floor: str | None = None
) -> float | None:
    """The same, as a share of the floor's p50 (0.05 = chatbus adds 5%)."""
    added = added_p50(r, path, floor)
    base = r["paths"][floor or FLOORS[path]]["seq"]["latency_ms"]["p50"]
    return None if added is None or not base else added / base


def paired_share(r: dict[str, Any], path: str = CHATBUS_LITELLM) -> float | None:
    """What chatbus adds as the median, over the sequential rounds, of its latency over its
    floor's in the same round, less one: the paths took turns, so drift falls on both."""
    ratio = r["paths"][path]["seq"].get("ratio_to_first")
    return None if ratio is None else ratio - 1


def rate_ratio(r: dict[str, Any], path: str = CHATBUS) -> float:
    floor = r["paths"][FLOORS[path]]["rate"]["chats_per_s"]
    return r["paths"][path]["rate"]["chats_per_s"] / floor if floor else 0.0


def gap_overhead(slow: dict[str, Any], gap_ms: float) -> float | None:
    p99 = slow["gap_ms"]["p99"]
    return None if p99 is None else p99 - gap_ms


def added_gap(r: dict[str, Any], path: str = CHATBUS) -> float | None:
    """What chatbus adds to the p99 gap the same client sees direct, in ms."""
    gap = r["counts"]["slow_gap_ms"]
    overhead, floor = (gap_overhead(r["slow"][p], gap) for p in (path, DIRECT))
    return None if overhead is None or floor is None else overhead - floor


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure DESIGN.md asks for: measured, met or not."""
    added = added_p50(r)
    ratio = rate_ratio(r)
    lite, lite_floor = (r["paths"][p] for p in (CHATBUS_LITELLM, LITELLM_DIRECT))
    lite_share = paired_share(r)
    like_share = added_share(r, CHATBUS_LITELLM, LITELLM_AT_USAGE)
    slow = r["slow"][CHATBUS]
    slow_added = added_gap(r)
    slow_errors = errors_of(slow)
    startup = r["startup"]["seconds"]
    total = r["errors_total"] - path_errors(r, CHATBUS_V1)  # /v1's have a row of their own
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
        {
            "target": "0 errors (every run above but /v1/chat/completions's)",
            "measured": str(total),
            "met": total == 0,
        },
        {
            # Side by side: what chatbus adds to the p99 gap the same client sees direct.
            "target": "1,000 slow streams: 0 errors, p99 gap over the floor's < 5 ms",
            "measured": f"{n} streams ({slow['max_open']} open at once), {slow_errors} errors,"
            f" p99 gap {ms(slow['gap_ms']['p99'])} vs floor"
            f" {ms(r['slow'][DIRECT]['gap_ms']['p99'])}: +{ms(slow_added)}",
            "met": n >= 1000
            and slow["all_open_at_once"]
            and slow_errors == 0
            and slow_added is not None
            and slow_added < 5.0,
        },
        {
            # Judged on the sequential rounds, paired; p50s and chats/s at c=100 shown along.
            "target": "litellm: chatbus adds < 10% to calling litellm directly (sequential,"
            " paired rounds)",
            "measured": f"{_share(lite_share)} (median of chatbus ÷ litellm per round);"
            f" p50 {ms(lite['seq']['latency_ms']['p50'])} vs"
            f" {ms(lite_floor['seq']['latency_ms']['p50'])} ({_share(added_share(r))});"
            f" chats/s at c={r['counts']['concurrency']}: {lite['rate']['chats_per_s']:.0f} vs"
            f" {lite_floor['rate']['chats_per_s']:.0f} ({rate_ratio(r, CHATBUS_LITELLM):.0%});"
            " like for like (litellm read to the usage, as chatbus reads it):"
            f" {_share(like_share)}, {ms(added_p50(r, CHATBUS_LITELLM, LITELLM_AT_USAGE))}",
            "met": lite_share is not None and lite_share < 0.10,
        },
        {
            "target": "start-up to first answer < 1 s (no litellm model configured)",
            "measured": f"{startup:.2f} s",
            "met": startup < 1.0,
        },
        *v1_information(r),
    ]


def v1_information(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets' openai_compat figures through /v1/chat/completions, beside /chat/chat's:
    information, judged by nothing (`met` None)."""
    v1 = r["slow"][CHATBUS_V1]
    about = "(/v1/chat/completions; information, not a target)"
    return [
        {
            "target": f"openai_compat chats/s at c={r['counts']['concurrency']} vs the floor"
            f" {about}",
            "measured": f"{rate_ratio(r, CHATBUS_V1):.0%} (/chat/chat: {rate_ratio(r):.0%})",
            "met": None,
        },
        {
            "target": f"openai_compat added p50 latency {about}",
            "measured": f"{ms(added_p50(r, CHATBUS_V1))} (/chat/chat: {ms(added_p50(r))})",
            "met": None,
        },
        {
            "target": f"slow streams: p99 gap over the floor's {about}",
            "measured": f"{v1['count']} streams ({v1['max_open']} open at once),"
            f" {errors_of(v1)} errors, p99 gap {ms(v1['gap_ms']['p99'])}:"
            f" +{ms(added_gap(r, CHATBUS_V1))} (/chat/chat: +{ms(added_gap(r))})",
            "met": None,
        },
        {
            "target": f"errors, every run {about}",
            "measured": str(path_errors(r, CHATBUS_V1)),
            "met": None,
        },
    ]


def _share(share: float | None) -> str:
    return "—" if share is None else f"{share:+.1%}"


def markdown(r: dict[str, Any]) -> str:
    c, m = r["counts"], r["machine"]
    lines = [
        f"# chatbus benchmark{' (quick)' if r['quick'] else ''}",
        "",
        f"- date: {r['date']}",
        f"- machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, Linux {m['kernel']},"
        f" litellm {m.get('litellm', 'not installed')}",
        f"- commit: {r['commit']}",
        f"- counts: sequential {c['seq_count']} answers a path after {c['seq_warmup']} warm-up,"
        " the paths taking turns (one answer from each a round, so drift falls on all alike);"
        f" rate {c['rate_count']} answers at concurrency {c['concurrency']};"
        f" {c['tokens']} tokens an answer; slow: {c['slow_streams']} streams of"
        f" {c['slow_tokens']} tokens, {c['slow_gap_ms']:.0f} ms apart",
        f"- one machine, loopback: fake upstream, chatbus and the load generator are separate"
        f" processes sharing the {m['nproc']} CPUs; history store on (SQLite)",
        "",
        *_main_table(r),
        "",
        "## /chat/chat beside /v1/chat/completions",
        "",
        *_routes_table(r),
        "",
        f"## Workers: /chat/chat at concurrency {c['concurrency']}",
        "",
        *_workers_table(r),
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
        *(f"| {t['target']} | {t['measured']} | {_verdict(t['met'])} |" for t in r["targets"]),
        "",
        "## Notes",
        "",
        *_notes(r),
        "",
    ]
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    if met is None:
        return "information"
    return "met" if met else "NOT MET"


def _main_table(r: dict[str, Any]) -> list[str]:
    c = r["counts"]
    rows = [
        f"| path | seq p50 | seq p99 | added p50 | chats/s (c={c['concurrency']}) | vs floor"
        " | errors | chatbus RSS rest | chatbus RSS peak | start-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # /v1's chatbus is /chat/chat's: its start-up and RSS at rest are that row's
    rest = {CHATBUS: r["rss_kb"]["rest"], CHATBUS_LITELLM: r["rss_kb"].get("litellm_rest")}
    startup = {CHATBUS: r["startup"]["seconds"], CHATBUS_LITELLM: r["startup"]["litellm_seconds"]}
    for key in (DIRECT, CHATBUS, CHATBUS_V1, LITELLM_DIRECT, LITELLM_AT_USAGE, CHATBUS_LITELLM):
        path = r["paths"][key]
        seq, rate = path["seq"]["latency_ms"], path["rate"]
        errors = errors_of(path["seq"]) + errors_of(rate)
        chatbus = key in FLOORS
        floor_key = LITELLM_DIRECT if key == LITELLM_AT_USAGE else FLOORS.get(key, key)
        floor = r["paths"][floor_key]["rate"]["chats_per_s"]
        added = ms(added_p50(r, key)) if chatbus else "—"
        if key == CHATBUS_LITELLM:
            added += f" ({_share(added_share(r, key))})"
        rows.append(
            f"| {NAMES[key]} | {ms(seq['p50'])} | {ms(seq['p99'])} | {added}"
            f" | {rate['chats_per_s']:.0f} | {rate['chats_per_s'] / floor if floor else 0:.0%}"
            f" | {errors} | {mb(rest.get(key))}"
            f" | {mb(path.get('rss_peak_kb')) if chatbus else '—'}"
            f" | {f'{startup[key]:.2f} s' if key in startup else '—'} |"
        )
    return rows


def _routes_table(r: dict[str, Any]) -> list[str]:
    """The openai_compat figures of both routes side by side: one chatbus, one model, one
    upstream; the floor's figure in the label."""
    floor = r["paths"][DIRECT]
    at = f"at c={r['counts']['concurrency']}"

    def path(key: str) -> dict[str, Any]:
        return r["paths"][key]

    def both(latency: dict[str, Any]) -> str:
        return f"{ms(latency['p50'])} / {ms(latency['p99'])}"

    def cpu(key: str, process: str) -> str:
        return ms(r["paths"][key]["cpu_ms_per_chat"].get(process))

    def over_chat(key: str) -> str:
        return "—" if key == CHATBUS else _ratio(path(key)["seq"].get("ratio_to", {}).get(CHATBUS))

    def slow_gap(key: str) -> str:
        return f"{ms(r['slow'][key]['gap_ms']['p99'])} (+{ms(added_gap(r, key))})"

    figures: list[tuple[str, Callable[[str], str]]] = [
        (
            f"chats/s {at} (share of the floor's {floor['rate']['chats_per_s']:.0f})",
            lambda k: f"{path(k)['rate']['chats_per_s']:.0f} ({rate_ratio(r, k):.0%})",
        ),
        (
            f"sequential p50 / p99 (floor: {both(floor['seq']['latency_ms'])})",
            lambda k: both(path(k)["seq"]["latency_ms"]),
        ),
        ("added p50 (over the floor's)", lambda k: ms(added_p50(r, k))),
        (
            "paired: median of route ÷ floor, round by round",
            lambda k: _ratio(path(k)["seq"].get("ratio_to_first")),
        ),
        ("paired: median of /v1 ÷ /chat/chat, round by round", over_chat),
        (f"chatbus CPU per answer {at}", lambda k: cpu(k, "chatbus")),
        (
            f"load generator CPU per answer {at} (floor: {cpu(DIRECT, 'client')})",
            lambda k: cpu(k, "client"),
        ),
        (
            f"latency under load {at}, p50 / p99 (floor: {both(floor['rate']['latency_ms'])})",
            lambda k: both(path(k)["rate"]["latency_ms"]),
        ),
        (f"chatbus RSS peak {at}", lambda k: mb(path(k).get("rss_peak_kb"))),
        (
            f"slow streams: gap p99 (+ over the floor's {ms(r['slow'][DIRECT]['gap_ms']['p99'])})",
            slow_gap,
        ),
        ("errors (every run)", lambda k: str(path_errors(r, k))),
    ]
    return [
        f"| figure | {ROUTES[CHATBUS]} (a write a frame) | {ROUTES[CHATBUS_V1]} (bursts joined) |",
        "|---|---|---|",
        *(f"| {label} | {cell(CHATBUS)} | {cell(CHATBUS_V1)} |" for label, cell in figures),
    ]


def _workers_table(r: dict[str, Any]) -> list[str]:
    """chats/s of /chat/chat with one process (the main run's) and with `--workers`: the same
    model, upstream and counts; every process shares the machine's CPUs."""
    one, many = r["paths"][CHATBUS], r["workers"]
    rows = [
        "| workers | chats/s | vs 1 worker | latency under load p50 / p99 | chatbus CPUs busy"
        " | chatbus CPU per answer | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for count, run in ((1, one), (many["count"], many)):
        rate = run["rate"]
        cores = run.get("cpu_cores", {}).get("chatbus")
        rows.append(
            f"| {count} | {rate['chats_per_s']:.0f}"
            f" | {rate['chats_per_s'] / one['rate']['chats_per_s']:.0%}"
            f" | {ms(rate['latency_ms']['p50'])} / {ms(rate['latency_ms']['p99'])}"
            f" | {'—' if cores is None else f'{cores:.2f}'}"
            f" | {ms(run['cpu_ms_per_chat'].get('chatbus'))} | {errors_of(rate)} |"
        )
    return rows


def _ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def _slow_table(r: dict[str, Any]) -> list[str]:
    gap = r["counts"]["slow_gap_ms"]
    rows = [
        "| path | errors | open at once | time to open all | gap p50 | gap p99 | gap max"
        f" | p99 overhead vs {gap:.0f} ms | chatbus RSS all open | RSS per open stream |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in (DIRECT, CHATBUS, CHATBUS_V1):
        s = r["slow"][key]
        chatbus = key != DIRECT
        per_stream = s.get("rss_per_stream_kb")
        per_stream_text = f"{per_stream:.1f} KiB" if chatbus and per_stream is not None else "—"
        rows.append(
            f"| {NAMES[key]} | {errors_of(s)} | {s['max_open']}/{s['count']}"
            f" | {s['open_all_s']:.2f} s | {ms(s['gap_ms']['p50'])} | {ms(s['gap_ms']['p99'])}"
            f" | {ms(s['gap_ms']['max'])} | {ms(gap_overhead(s, gap))}"
            f" | {mb(s.get('rss_open_kb')) if chatbus else '—'}"
            f" | {per_stream_text} |"
        )
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
        f"- workers: the 1-worker row is the run of `chatbus openai_compat` above; the"
        f" {r['workers']['count']}-worker row a chatbus started with `serve --workers"
        f" {r['workers']['count']}` (SO_REUSEPORT; its CPU is its workers' sum), the same"
        f" counts, after the slow streams; the {r['machine']['nproc']} CPUs are shared with"
        " the upstream and the load generator, so more workers pay when chatbus has cores"
        " of its own",
        *_v1_notes(r),
        *_litellm_notes(r),
    ]
    for key, label in ((DIRECT, "direct"), (CHATBUS, "chatbus"), (CHATBUS_V1, "chatbus /v1")):
        for run in (r["paths"][key]["seq"], r["paths"][key]["rate"], r["slow"][key]):
            for example in run["errors"]["examples"][:2]:
                notes.append(f"- error ({label}): `{example}`")
    litellm_paths = (
        (LITELLM_DIRECT, "litellm direct"),
        (LITELLM_AT_USAGE, "litellm to the usage"),
        (CHATBUS_LITELLM, "chatbus litellm"),
    )
    for key, label in litellm_paths:
        for run in (r["paths"][key]["seq"], r["paths"][key]["rate"]):
            for example in run["errors"]["examples"][:2]:
                notes.append(f"- error ({label}): `{example}`")
    return notes


def _v1_notes(r: dict[str, Any]) -> list[str]:
    v1, slow = r["paths"][CHATBUS_V1], r["slow"][CHATBUS_V1]
    return [
        "- `via /v1/chat/completions` is the same chatbus process, model (`fast`, then `slow`)"
        " and upstream as `chatbus openai_compat` (`/chat/chat`), so its start-up and RSS at"
        ' rest are that row\'s. It asks `{"model", "messages", "stream": true}`'
        " (no `stream_options`, so no usage chunk) and is read as the floor's stream is: the"
        " content chunks (the opening role chunk's empty content not counted), then `[DONE]`."
        " /chat/chat writes each frame on its own (chatchat's clients parse one a chunk);"
        " /v1 joins a burst of frames into one write. It takes its turn in the sequential"
        " rounds with the other two, and runs after /chat/chat in the rate and slow-stream"
        " runs, so those of /chat/chat, which the targets judge, run as they did without it",
        f"- /v1 CPU per answer at c={r['counts']['concurrency']}: chatbus"
        f" {ms(v1['cpu_ms_per_chat'].get('chatbus'))}, upstream"
        f" {ms(v1['cpu_ms_per_chat'].get('upstream'))}, load generator"
        f" {ms(v1['cpu_ms_per_chat'].get('client'))}; CPUs busy {_cores(v1)} at"
        f" c={r['counts']['concurrency']}, {_cores(slow)} with its slow streams all open",
        f"- /v1's slow streams: chatbus RSS just before them {mb(slow.get('rss_rest_kb'))}, after"
        " /chat/chat's in the same process: the memory those grew is reused, so its RSS per open"
        " stream is not comparable with /chat/chat's (a lower bound)",
    ]


def _litellm_notes(r: dict[str, Any]) -> list[str]:
    c = r["counts"]
    floor, chatbus = r["paths"][LITELLM_DIRECT], r["paths"][CHATBUS_LITELLM]
    like = r["paths"][LITELLM_AT_USAGE]
    return [
        '- litellm rows: the floor calls `litellm.acompletion(model="openai/fake-model", '
        "stream=True)` in the load process against the same fast upstream, with the request "
        "chatbus's litellm model sends, and reads the stream to its end (run on uvloop with "
        "chatbus's GC settings, as chatbus runs litellm; the sequential rounds' client of "
        "chatbus runs in that process too, and pays its collections); `added p50` and `vs "
        "floor` of `chatbus litellm` are against it. chatbus stops reading at litellm's usage"
        " chunk when no litellm success callback is configured, which skips litellm's second "
        "assembly of the answer and its success logging: the row `read to the usage` does the"
        " same in-process, so chatbus's own cost is the gap between that row and chatbus's. A"
        " chatbus of its own serves the litellm model, started after the runs above; counts:"
        f" sequential {c['lite_seq_count']} rounds of the three in turns after"
        f" {c['lite_seq_warmup']} warm-up, rate"
        f" {c['lite_rate_count']} answers at concurrency {c['concurrency']}",
        f"- start-up with a litellm model configured: {r['startup']['litellm_seconds']:.2f} s"
        f" to the first answer (importing litellm included; {r['startup']['seconds']:.2f} s"
        f" without one); RSS at rest {mb(r['rss_kb'].get('litellm_rest'))}"
        f" ({mb(r['rss_kb']['rest'])} without)",
        f"- litellm CPU per answer at c={c['concurrency']}: chatbus"
        f" {ms(chatbus['cpu_ms_per_chat'].get('chatbus'))}, upstream"
        f" {ms(chatbus['cpu_ms_per_chat'].get('upstream'))}, load generator"
        f" {ms(chatbus['cpu_ms_per_chat'].get('client'))}; litellm in-process (the load"
        f" process) {ms(floor['cpu_ms_per_chat'].get('client'))}, read to the usage"
        f" {ms(like['cpu_ms_per_chat'].get('client'))}",
        f"- litellm latency under load at c={c['concurrency']} (p50 / p99): in-process"
        f" {ms(floor['rate']['latency_ms']['p50'])} / {ms(floor['rate']['latency_ms']['p99'])},"
        f" via chatbus {ms(chatbus['rate']['latency_ms']['p50'])}"
        f" / {ms(chatbus['rate']['latency_ms']['p99'])}",
    ]


def _cores(run: dict[str, Any]) -> str:
    cores = run.get("cpu_cores") or {}
    if not cores:
        return "(too short to sample)"
    return "(" + ", ".join(f"{name} {value:.2f}" for name, value in cores.items()) + ")"
