"""The suite's markdown report: the results table (metergate, direct, both peers and the
floor side by side), the targets met or not, the method, profiles, checks and every run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from benchlib import native, portkey, profile, scrape, upstream, workers_report
from benchlib.litellm import REQUIREMENTS as LITELLM_REQUIREMENTS
from benchlib.outcome import (
    ONE,
    SAT,
    MemoryResult,
    Outcome,
    Pacing,
    ProfileResult,
    Runs,
    half_load_name,
    med,
    median_of,
)
from benchlib.report import REPO, table
from benchlib.targets import DIRECT, FLOOR_LABEL, LITELLM, METERGATE, NAMES, PEERS


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def ratio(a: float, b: float, digits: int = 3) -> str:
    """`a / b` as `1.234x`, or n/a when b is zero or a measurement is missing."""
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.{digits}f}x"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def summary_rows(
    o: Outcome, args: argparse.Namespace
) -> tuple[list[list[str]], list[tuple[str, bool, str]]]:
    """The results table (columns: `columns(o)`) and the targets (label, met, evidence)."""
    rows: list[list[str]] = []
    targets: list[tuple[str, bool, str]] = []
    peers = [p for p in PEERS if p in o.names]
    nan = float("nan")

    def v(name: str, load: str, attribute: str, runs: Runs) -> float:
        return median_of(runs, name, load, attribute) if (name, load) in runs else nan

    def row(
        label: str,
        direct: str,
        mine: str,
        theirs: dict[str, str],
        floor: str = "",
        vs_direct: str = "",
        vs: dict[str, str] | None = None,
    ) -> None:
        rows.append(
            [
                label,
                direct,
                mine,
                *(theirs.get(p, "n/a") for p in peers),
                floor,
                vs_direct,
                *((vs or {}).get(p, "") for p in peers),
            ]
        )

    def added(value: float, direct: float) -> str:
        return "n/a" if math.isnan(value - direct) else f"{value - direct:+.3f} ms"

    rps = {n: v(n, SAT, "rps", o.unary) for n in [*o.names, FLOOR_LABEL]}
    row(
        f"non-streaming requests/s, 1 worker (wrk -c{args.connections})",
        _f(rps[DIRECT], 0),
        _f(rps[METERGATE], 0),
        {p: _f(rps[p], 0) for p in peers},
        _f(rps[FLOOR_LABEL], 0),
        ratio(rps[METERGATE], rps[DIRECT]),
        {p: ratio(rps[METERGATE], rps[p], 1) for p in peers},
    )
    targets.append(
        (
            "≥ 5,000 non-streaming requests/s (one worker, all features on)",
            rps[METERGATE] >= 5000,
            f"{rps[METERGATE]:,.0f}/s; floor (bare Python proxy) {rps[FLOOR_LABEL]:,.0f}/s "
            f"= {ratio(rps[METERGATE], rps[FLOOR_LABEL], 2)} of the floor",
        )
    )
    if LITELLM in peers:
        times = rps[METERGATE] / rps[LITELLM] if rps[LITELLM] else float("inf")
        targets.append(
            (
                "≥ 50x LiteLLM's requests/s, same run",
                times >= 50,
                f"{times:.1f}x ({rps[LITELLM]:,.0f}/s)",
            )
        )
    for field_name, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        values = {n: v(n, ONE, field_name, o.unary) for n in o.names}
        row(
            f"{label} latency, 1 connection (ms)",
            _f(values[DIRECT]),
            _f(values[METERGATE]),
            {p: _f(values[p]) for p in peers},
            _f(v(FLOOR_LABEL, ONE, field_name, o.unary)),
            added(values[METERGATE], values[DIRECT]),
            {p: added(values[p], values[DIRECT]) for p in peers},
        )
        if label == "p50":
            extra = round(values[METERGATE] - values[DIRECT], 3)  # wrk's resolution: 10 µs
            targets.append(
                ("added latency ≤ 0.3 ms p50 at 1 connection", extra <= 0.3, f"{extra:+.3f} ms")
            )
    gateways = [n for n in (METERGATE, *peers) if n in o.half_connections]
    for field_name, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        by = {}
        for name in gateways:
            c = o.half_connections[name]
            load = half_load_name(c)
            by[name] = (v(name, load, field_name, o.half), v(DIRECT, load, field_name, o.half), c)
        m = by[METERGATE]
        floor_load = half_load_name(m[2])
        row(
            f"{label} latency at ~half of max load (ms); -c = gateway's half-load count",
            " / ".join(f"{_f(by[n][1])} (-c{by[n][2]})" for n in gateways),
            f"{_f(m[0])} (-c{m[2]})",
            {p: f"{_f(by[p][0])} (-c{by[p][2]})" for p in peers if p in by},
            f"{_f(v(FLOOR_LABEL, floor_load, field_name, o.half))} (-c{m[2]})",
            added(m[0], m[1]),
            {p: added(by[p][0], by[p][1]) for p in peers if p in by},
        )
        if label == "p99":
            targets.append(
                (
                    "added latency ≤ 2 ms p99 at half of max load",
                    m[0] - m[1] <= 2.0,
                    added(m[0], m[1]),
                )
            )
    ttft = {
        n: (med([r.p50_ms for r in o.ttft[n]]), med([r.p99_ms for r in o.ttft[n]])) for n in o.ttft
    }
    for index, label in ((0, "p50"), (1, "p99")):
        row(
            f"stream: time to first chunk {label}, 1 connection (ms)",
            _f(ttft[DIRECT][index]),
            _f(ttft[METERGATE][index]),
            {p: _f(ttft[p][index]) for p in peers if p in ttft},
            "",
            added(ttft[METERGATE][index], ttft[DIRECT][index]),
            {p: added(ttft[p][index], ttft[DIRECT][index]) for p in peers if p in ttft},
        )
    added_ttft = ttft[METERGATE][0] - ttft[DIRECT][0]
    targets.append(
        (
            "streaming: added time to first chunk ≤ 0.5 ms p50",
            added_ttft <= 0.5,
            f"{added_ttft:+.3f} ms",
        )
    )
    chunks = {n: v(n, "streams", "rps", o.streams) * upstream.STREAM_CHUNKS for n in o.names}
    row(
        f"stream: chunks/s (wrk -c{args.connections}, 50-chunk streams)",
        _f(chunks[DIRECT], 0),
        _f(chunks[METERGATE], 0),
        {p: _f(chunks[p], 0) for p in peers},
        "",
        ratio(chunks[METERGATE], chunks[DIRECT]),
        {p: ratio(chunks[METERGATE], chunks[p], 1) for p in peers},
    )
    if o.pacing is not None:
        pacing_rows(o.pacing, row, targets, peers)
    if o.memory:
        mem = o.memory
        row(
            "RSS idle (MiB, VmRSS)",
            "",
            _f(mem[METERGATE].idle.rss_mib, 1),
            {p: _f(mem[p].idle.rss_mib, 1) for p in peers if p in mem},
        )
        if o.loaded_rss_mib:
            loaded = {n: f"{_f(a, 1)} → {_f(b, 1)}" for n, (a, b) in o.loaded_rss_mib.items()}
            row(
                "RSS before → after the non-streaming loads (MiB, VmRSS; after the streams)",
                "",
                loaded[METERGATE],
                {p: loaded[p] for p in peers if p in loaded},
            )
        row(
            f"peak RSS with {args.streams:,} concurrent slow streams (MiB)",
            "",
            _f(mem[METERGATE].peak_mib, 1) + streams_note(mem[METERGATE]),
            {p: _f(mem[p].peak_mib, 1) + streams_note(mem[p]) for p in peers if p in mem},
            vs={
                p: ratio(mem[p].peak_mib, mem[METERGATE].peak_mib, 1) + " less"
                for p in peers
                if p in mem
            },
        )
        mine = mem[METERGATE]
        targets.append(
            (
                f"≤ 100 MB RSS with {args.streams:,} concurrent streams",
                mine.peak_mib * 1.048576 <= 100 and mine.peak_open >= args.streams,
                f"peak {mine.peak_mib:.1f} MiB = {mine.peak_mib * 1.048576:.1f} MB, "
                f"{mine.peak_open} open at once, {mine.streams_ok} completed",
            )
        )
    if o.scrape is not None:
        s = o.scrape
        row(
            f"/metrics scrape, {scrape.MODELS} models x {scrape.KEYS} keys (ms, median of "
            f"{len(s.scrape_ms)})",
            "",
            _f(s.median_ms, 1),
            {},
        )
        targets.append(
            (
                "/metrics scrape ≤ 50 ms at 50 models x 200 keys",
                s.median_ms <= 50,
                f"{s.median_ms:.1f} ms for {s.series:,} samples, {s.body_bytes / 1e6:.1f} MB",
            )
        )
    for rate in o.ledger:
        row(
            f"ledger rows/s, LedgerWriter on {rate.backend} ({rate.rows:,} rows)",
            "",
            _f(rate.rows_per_second, 0),
            {},
        )
    row(
        "ledger rows pending, max under the wrk loads (sampled every 0.5 s)",
        "",
        f"{o.max_pending:,}",
        {},
    )
    if o.workers is not None:
        targets += workers_report.targets(o.workers, o.scrape)
    return rows, targets


def pacing_rows(
    pacing: Pacing,
    row: Callable[..., None],
    targets: list[tuple[str, bool, str]],
    peers: list[str],
) -> None:
    lag = {n: pacing.lag_ms(n) for n in pacing.arrivals if n != DIRECT}

    def lags(name: str) -> str:
        found = lag[name]
        return (
            f"{found.first_ms:+.1f} / {_f(found.median_ms, 1)} / {_f(found.max_ms, 1)}, "
            f"{pacing.reads[name]} reads"
        )

    row(
        "slow stream (~10 s): first event later than direct / later events behind "
        "their direct pace, median / max (ms)",
        f"{len(pacing.arrivals[DIRECT])} events, 1 per {pacing.event_ms:.0f} ms, "
        f"{pacing.reads[DIRECT]} reads",
        lags(METERGATE),
        {p: lags(p) for p in peers if p in lag},
    )
    m = lag[METERGATE]
    unbuffered = (
        m.median_ms <= pacing.event_ms / 4
        and pacing.reads[METERGATE] >= len(pacing.arrivals[DIRECT]) // 2
    )
    targets.append(
        (
            "streaming: no buffering of chunks",
            unbuffered,
            f"events relayed at the upstream's pace: median {m.median_ms:.1f} ms / max "
            f"{m.max_ms:.1f} ms behind it (one event every {pacing.event_ms:.0f} ms), "
            f"{pacing.reads[METERGATE]} separate reads over "
            f"{pacing.arrivals[DIRECT][-1]:.1f} s",
        )
    )


def columns(o: Outcome) -> tuple[list[str], str]:
    """The header of the results table and its alignment."""
    peers = [p for p in PEERS if p in o.names]
    header = [
        "workload",
        "direct (nginx)",
        "metergate",
        *(NAMES[p] for p in peers),
        "floor (minimal proxy)",
        "metergate vs direct",
        *(f"metergate vs {NAMES[p]} ({NAMES[p]} vs direct for latency)" for p in peers),
    ]
    return header, "l" + "r" * (len(header) - 1)


def streams_note(memory: MemoryResult) -> str:
    return (
        f" ({memory.streams_ok:,} completed, first event p50 "
        f"{memory.first_event_ms / 1000:.2f} s, stream p50 {memory.duration_s:.1f} s)"
    )


def _header_rows(o: Outcome, rows: list[list[str]]) -> tuple[list[str], list[list[str]], str]:
    header, align = columns(o)
    return header, rows, align


def render(o: Outcome, args: argparse.Namespace) -> str:
    rows, targets = summary_rows(o, args)
    parts = [
        "# metergate benchmark suite",
        "",
        "One worker per gateway (several in the workers section), every metergate feature "
        "on (key auth, metrics, SQLite "
        "ledger, prices, a hard budget). nginx answers fixed OpenAI completions. "
        f"Medians of {args.runs} interleaved runs of {args.duration} s unless said otherwise. "
        "Reproduce: `.venv/bin/python bench/suite.py`.",
        "",
        table(*_header_rows(o, rows)),
        "",
        "## Targets",
        "",
        table(
            ["target", "result", "measured"],
            [[label, _met(ok), evidence] for label, ok, evidence in targets],
            "lll",
        ),
        "",
        "## Method",
        "",
        *method_lines(o, args),
        "",
    ]
    if o.workers is not None:
        parts += workers_report.section(o.workers)
    if o.profiled is not None:
        parts += profile_section(o.profiled)
    if o.native or o.native_skipped:
        parts += native.section(o.native, o.native_skipped, args.connections)
    if o.scrape_raw is not None and o.scrape_raw.exists():
        parts += scrape_profile_section(profile.analyse(o.scrape_raw, top=15))
    if o.micro:
        parts += [
            "## What the small hot-path changes buy (bench/benchlib/micro.py)",
            "",
            table(
                ["change", "before ns", "after ns", "saved ns per request"],
                [[what, f"{a:,.0f}", f"{b:,.0f}", f"{a - b:,.0f}"] for what, a, b in o.micro],
                "lrrr",
            ),
            "",
        ]
    parts += ["## Checks", ""]
    for check in o.checks:
        mark = "ok" if check.ok else ("FAILED" if check.required else "warning")
        parts.append(f"- **{mark}**: {check.name}" + (f" ({check.detail})" if check.detail else ""))
    parts += ["", "## Environment and versions", ""]
    parts += [f"- {name}: {value}" for name, value in o.env]
    for name, versions in o.peer_versions.items():
        parts.append(
            f"- {NAMES[name]}: "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + f" ({o.peer_install.get(name, '')})"
        )
    parts += ["", "## Every run", "", runs_table(o), ""]
    for name, text in o.configs.items():
        parts += [f"### {name}", "", "```yaml", text.strip(), "```", ""]
    return "\n".join(parts)


def method_lines(o: Outcome, args: argparse.Namespace) -> list[str]:
    calibration = "; ".join(
        f"{NAMES[name]}: " + ", ".join(f"-c{c} {r:,.0f}/s" for c, r in tried)
        for name, tried in o.calibration.items()
    )
    lines = [
        f"- Load: wrk 4 -t1 (`bench/wrk/post.lua`, `bench/wrk/stream.lua`), {args.duration} s "
        f"per run after a {args.warmup} s warm-up per target; saturation = -c{args.connections}; "
        "targets interleaved within each run.",
        "- Half of max load: wrk2 is not in Debian, so wrk is closed-loop: each gateway gets "
        "the connection count whose throughput is closest to half of its own median max "
        f"(tried 2 s each: {calibration}); direct nginx is measured at the same count, "
        "and the difference is the gateway's added latency.",
        f"- Time to first chunk: an asyncio + httptools probe (`bench/benchlib/probe.py`, on "
        f"uvloop) sends {args.ttft_requests} streamed requests one after the other on one "
        "keep-alive connection per target and run, and stamps the first body bytes; the "
        "direct upstream is probed the same way, so the difference is the gateway's.",
        f"- Chunks/s: wrk -c{args.connections} on the 50-chunk stream; a request counts when "
        "its whole stream has arrived, so chunks/s = completed streams/s x 50.",
        f"- No buffering: nginx sends the same stream at {upstream.slow_rate()} B/s "
        f"(`limit_rate`, ~{upstream.SLOW_SECONDS:.0f} s per stream); one such stream per "
        "target, all at once, and every event's arrival time is compared with its direct one.",
        f"- Memory: VmRSS of the gateway's process tree (`/proc/PID/status`) idle, then "
        f"sampled every 0.1 s while {args.streams:,} slow streams are open at once "
        f"({args.streams:,} client connections in, as many upstream connections out); peak "
        "reported. "
        "Measured before the throughput runs.",
        f"- /metrics: its own metergate with {scrape.MODELS} models on the simulated provider "
        f"(latency 0) and {scrape.KEYS} keys; one request per (model, key) = "
        f"{scrape.MODELS * scrape.KEYS:,} requests creates the series; then GET /metrics "
        "10 times, one after the other, timed by the client (urllib).",
        "- Ledger: metergate's own LedgerWriter in the suite's process appends "
        f"{args.ledger_rows:,} rows in bursts of 100 (yielding between bursts) and the clock "
        "stops when close() has committed the last one (group commit every 0.2 s or 1,000 "
        f"rows). PostgreSQL as tests/services.py runs it (fsync off): {o.postgres}.",
        "- LiteLLM: `" + " ".join(LITELLM_REQUIREMENTS) + "` in `bench/.litellm-venv`, "
        "`litellm --config FILE --num_workers 1`; master key, per-model prices, "
        "`callbacks: [prometheus]`; no virtual keys, spend logs nor budgets (they need its "
        "Prisma database, whose engines cannot be downloaded here), so it does less per "
        "request than metergate (see `bench/benchlib/litellm.py`).",
        "- Portkey: `"
        + " ".join(f"{n}@{v}" for n, v in portkey.PACKAGES.items())
        + "` from the npm registry in `bench/.portkey`, `node build/start-server.js "
        "--port=N --headless` on 127.0.0.1; each request names its upstream with "
        "`x-portkey-provider: openai` and `x-portkey-custom-host`. It has no gateway keys, "
        "metrics, ledger, prices or budgets, and waits 25 ms before relaying a stream's "
        "first chunk (see `bench/benchlib/portkey.py`).",
        "- Floor: bench/stack's minimal proxy (uvicorn + bare httptools client, parse JSON, "
        "swap the model, relay) in the same run: what a Python proxy costs on this machine "
        "before any gateway feature.",
    ]
    return lines


def profile_section(p: ProfileResult) -> list[str]:
    total = p.profile.samples or 1

    def pct(count: int) -> str:
        return f"{100 * count / total:.1f}%"

    inclusive = []
    for (function, file), count in p.profile.inclusive[:30]:
        line = p.def_lines.get((function, file))
        where = f"{file}:{line}" if line else file
        inclusive.append([pct(count), f"`{function}`", f"`{where}`"])
    self_rows = [
        [pct(count), f"`{frame.function}`", f"`{frame.where}`"]
        for frame, count in p.profile.self_lines[:20]
    ]
    packages = [[pct(count), f"`{name}`"] for name, count in p.profile.self_by_package[:15]]
    return [
        "## Profile of metergate at saturation",
        "",
        f"py-spy {p.profile.samples:,} samples at 200 Hz while wrk -c64 drove "
        f"{p.rps:,.0f} requests/s (sampling slows it a little); idle samples excluded. "
        f"Raw stacks: `{p.raw.relative_to(REPO) if p.raw.is_relative_to(REPO) else p.raw}`.",
        "",
        "### Inclusive, by function",
        "",
        table(["inclusive", "function", "defined at"], inclusive, "rll"),
        "",
        "### Self time, by line",
        "",
        table(["self", "function", "line"], self_rows, "rll"),
        "",
        "### Self time, by package",
        "",
        table(["self", "package"], packages, "rl"),
        "",
    ]


def scrape_profile_section(p: profile.Profile) -> list[str]:
    total = p.samples or 1
    rows = [
        [f"{100 * count / total:.1f}%", f"`{function}`", f"`{file}`"]
        for (function, file), count in p.inclusive[:15]
    ]
    return [
        "## Profile of metergate serving GET /metrics (50 models x 200 keys)",
        "",
        f"py-spy, {p.samples:,} samples over the 10 scrapes; inclusive, by function.",
        "",
        table(["inclusive", "function", "file"], rows, "rll"),
        "",
    ]


def runs_table(o: Outcome) -> str:
    rows = []
    for runs in (o.unary, o.half, o.streams):
        for (name, load), results in runs.items():
            for index, r in enumerate(results, 1):
                rows.append(
                    [
                        NAMES.get(name, name),
                        load,
                        str(index),
                        str(r.requests),
                        f"{r.rps:,.0f}",
                        _f(r.p50_ms or float("nan")),
                        _f(r.p99_ms or float("nan")),
                        str(r.errors),
                    ]
                )
    for name, results in o.ttft.items():
        for index, t in enumerate(results, 1):
            rows.append(
                [
                    NAMES[name],
                    "first chunk (probe)",
                    str(index),
                    f"{t.complete}/{t.count}",
                    "",
                    _f(t.p50_ms),
                    _f(t.p99_ms),
                    str(t.count - t.complete),
                ]
            )
    if o.scrape is not None:
        rows.append(
            [
                NAMES[METERGATE],
                "GET /metrics",
                "1..10",
                str(o.scrape.requests),
                "",
                _f(o.scrape.median_ms, 1),
                _f(max(o.scrape.scrape_ms), 1),
                str(o.scrape.non_200),
            ]
        )
    return table(
        ["target", "load", "run", "requests", "requests/s", "p50 ms", "p99 ms", "errors"],
        rows,
        "lllrrrrr",
    )
