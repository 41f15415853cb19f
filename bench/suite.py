"""The whole metergate benchmark suite, against nginx and against LiteLLM's proxy.

    .venv/bin/python bench/suite.py [--duration 5] [--runs 3] [--output FILE]

One command, about 10 minutes (plus LiteLLM's install the first time). nginx answers
fixed OpenAI completions (plain, a 50-chunk SSE stream, and the same stream paced over
~10 s); each workload runs against nginx directly, through metergate (1 worker, every
feature on: key auth, metrics, SQLite ledger, prices, a hard budget) and through
LiteLLM's proxy (1 worker, master key, Prometheus callback), in the same run, runs
interleaved, medians reported with their ratios:

1. memory: RSS idle, and peak RSS with 1,000 slow streams open at once;
2. no buffering: one slow stream per target, at the same time: when each event arrives;
3. non-streaming requests/s at saturation (wrk -c64), and p50/p99 at 1 connection (also
   for bench/stack's minimal uvicorn + bare-client proxy: the floor of a Python proxy);
4. p50/p99 at about half of each gateway's max throughput (wrk with the connection count
   that gives it; direct measured at the same count);
5. streaming: time to first chunk at 1 connection (asyncio probe), chunks/s (wrk -c64);
6. a py-spy profile of metergate under the saturation load;
7. `/metrics` scrape time with 50 models x 200 keys of live series (its own gateway);
8. ledger rows/s of metergate's LedgerWriter on SQLite and PostgreSQL.

Writes a markdown report (`bench/results/suite.md`): tables, targets met or not, every
run, the profile's top, checks, versions and settings. Everything listens on 127.0.0.1,
every load is bounded in time, and every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from benchlib import gateway as gw
from benchlib import (
    ledger_rate,
    litellm,
    micro,
    probe,
    procfs,
    procs,
    profile,
    report,
    scrape,
    upstream,
    wrk,
)
from benchlib.report import Check, table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DIRECT_TOKEN = "sk-bench"
UNARY_BODY = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = (
    b'{"model":"bench-stream","messages":[{"role":"user","content":"hi"}],"stream":true,'
    b'"stream_options":{"include_usage":true}}'
)
SLOW_BODY = STREAM_BODY.replace(b"bench-stream", b"bench-slow")
STREAM_EVENTS = upstream.STREAM_BODY.count(b"\n\n")  # 50 chunks + usage + [DONE]
EXPECTED_COST_HEADER = "0.000025000"  # 11 input x $1/M + 7 output x $2/M
FLOOR_LABEL = "floor"

DIRECT, METERGATE, LITELLM = "direct", "metergate", "litellm"
NAMES = {
    DIRECT: "direct (nginx)",
    METERGATE: "metergate",
    LITELLM: "LiteLLM",
    FLOOR_LABEL: "floor (bench/stack uvicorn + bare)",
}


@dataclass(frozen=True)
class Target:
    """One thing to load: where its three endpoints are, its token, its process."""

    name: str
    token: str
    unary: str
    stream: str
    slow: str
    pid: int | None = None


@dataclass(frozen=True)
class CpuLayout:
    gateway: str | None  # every gateway (metergate, LiteLLM, floor), one at a time busy
    other: str | None  # nginx, wrk, py-spy and this process's probes

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned"
        return (
            f"gateways (metergate, LiteLLM, floor) on CPU {self.gateway}, one loaded at a "
            f"time; nginx, wrk, py-spy and the suite's asyncio probes on CPU {self.other}"
        )


def cpu_layout(pin: bool) -> CpuLayout:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
        return CpuLayout(None, None)
    return CpuLayout(str(cpus[0]), ",".join(map(str, cpus[1:])))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved repetitions (5)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per target (3)")
    parser.add_argument("--connections", type=int, default=64, help="saturation load (64)")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent slow streams")
    parser.add_argument("--ttft-requests", type=int, default=300, help="probe streams per run")
    parser.add_argument("--profile-seconds", type=int, default=10, help="py-spy duration (10)")
    parser.add_argument("--ledger-rows", type=int, default=100_000, help="rows per backend")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--no-postgres", action="store_true", help="ledger on SQLite only")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, ledger)")
    parser.add_argument(
        "--output", type=Path, default=BENCH / "results" / "suite.md", help="markdown report"
    )
    return parser.parse_args(argv)


def _ms(seconds: float) -> float:
    return seconds * 1000


def med(values: list[float]) -> float:
    return float(statistics.median(values))


# --------------------------------------------------------------------------------------
# Starting the targets and checking they answer right.
# --------------------------------------------------------------------------------------


def start_floor(processes: procs.Processes, workdir: Path, chat_url: str, cpus: str | None) -> str:
    """bench/stack's minimal proxy on uvicorn with its bare httptools client: the floor."""
    port = procs.free_port()
    command = [
        sys.executable,
        str(BENCH / "stack" / "compare.py"),
        "serve",
        "--server",
        "uvicorn",
        "--client",
        "bare",
        "--port",
        str(port),
        "--upstream",
        chat_url,
    ]
    env = {**os.environ, "PROXY_CLIENT": "bare", "PROXY_UPSTREAM": chat_url, "PROXY_GC": ""}
    started = processes.start("floor", procs.pinned(command, cpus), workdir / "floor.log", env)
    procs.wait_ready(started, f"http://127.0.0.1:{port}/healthz", timeout=60)
    return f"http://127.0.0.1:{port}{upstream.CHAT_PATH}"


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def _content_events(body: bytes) -> int:
    return sum(1 for event in body.split(b"\n\n") if b'"content"' in event)


def verify(targets: dict[str, Target], floor: str | None) -> list[Check]:
    """Fail loudly unless every target answers what the upstream sent; note what each adds."""
    checks = []
    for name in (DIRECT, METERGATE):
        target = targets[name]
        answer = procs.http(target.unary, UNARY_BODY, _headers(target.token))
        if answer.status != 200 or answer.body != upstream.CHAT_BODY:
            raise procs.BenchError(f"{name} answered {answer.status}: {answer.body[:300]!r}")
        streamed = procs.http(target.stream, STREAM_BODY, _headers(target.token))
        if streamed.status != 200 or streamed.body != upstream.STREAM_BODY:
            raise procs.BenchError(
                f"{name} stream: HTTP {streamed.status}, {len(streamed.body)} bytes"
            )
    checks.append(
        Check(
            "direct and metergate answer 200 with the upstream body and stream byte for byte", True
        )
    )
    cost = procs.http(
        targets[METERGATE].unary, UNARY_BODY, _headers(targets[METERGATE].token)
    ).headers.get("x-metergate-cost-usd")
    checks.append(
        Check(
            "metergate prices the request at 11 x $1/M + 7 x $2/M",
            cost == EXPECTED_COST_HEADER,
            f"x-metergate-cost-usd: {cost}",
        )
    )
    if floor is not None:
        answer = procs.http(floor, UNARY_BODY, _headers("x"))
        if answer.status != 200 or answer.body != upstream.CHAT_BODY:
            raise procs.BenchError(f"the floor proxy answered {answer.status}")
    if LITELLM in targets:
        target = targets[LITELLM]
        answer = procs.http(target.unary, UNARY_BODY, _headers(target.token))
        data = orjson.loads(answer.body) if answer.status == 200 else {}
        content = data.get("choices", [{}])[0].get("message", {}).get("content")
        usage = data.get("usage", {}).get("total_tokens")
        if answer.status != 200 or content != "Hello from the bench upstream." or usage != 18:
            raise procs.BenchError(f"LiteLLM answered {answer.status}: {answer.body[:300]!r}")
        streamed = procs.http(target.stream, STREAM_BODY, _headers(target.token))
        events = _content_events(streamed.body)
        if streamed.status != 200 or events < upstream.STREAM_CHUNKS:
            raise procs.BenchError(f"LiteLLM stream: HTTP {streamed.status}, {events} chunks")
        checks.append(
            Check(
                "LiteLLM answers 200 with the upstream's content and usage (re-serialised), "
                "and relays every chunk of the stream",
                True,
                f"{events} content chunks",
            )
        )
        metrics = procs.http(target.unary.replace("/v1/chat/completions", "/metrics/"))
        series = sum(
            1 for line in metrics.body.splitlines() if line.startswith(b"litellm_proxy_total")
        )
        checks.append(
            Check(
                "LiteLLM's Prometheus callback is on (litellm_proxy_total_requests_metric)",
                metrics.status == 200 and series > 0,
                f"HTTP {metrics.status}, {series} series",
            )
        )
    return checks


# --------------------------------------------------------------------------------------
# Memory and buffering (first, so that VmHWM has not yet seen the saturation runs).
# --------------------------------------------------------------------------------------


@dataclass
class MemoryResult:
    idle: procfs.Memory
    peak_rss_kib: int
    after: procfs.Memory
    streams_ok: int
    peak_open: int
    first_event_ms: float  # median over the streams
    duration_s: float  # median

    @property
    def peak_mib(self) -> float:
        return max(self.peak_rss_kib, self.after.rss_kib) / 1024


def memory_test(target: Target, streams: int) -> MemoryResult:
    assert target.pid is not None
    idle = procfs.memory(target.pid)
    sampler = procfs.Sampler(target.pid)
    exchanges = probe.run(
        probe.concurrent(
            target.slow, SLOW_BODY, target.token, streams, seconds=90, while_open=sampler.run
        )
    )
    after = procfs.memory(target.pid)
    ok = [e for e in exchanges if e.status == 200 and e.error is None and b"[DONE]" in e.body]
    return MemoryResult(
        idle=idle,
        peak_rss_kib=sampler.peak_rss_kib,
        after=after,
        streams_ok=len(ok),
        peak_open=probe.peak_open(exchanges),
        first_event_ms=_ms(med([e.first_event for e in ok if e.first_event is not None] or [0])),
        duration_s=med([e.done for e in ok if e.done is not None] or [0]),
    )


@dataclass
class Pacing:
    """When each event of the slow stream arrived (s after sending), per target."""

    arrivals: dict[str, list[float]]
    reads: dict[str, int]

    def lag_ms(self, name: str) -> PacingLag:
        """How `name` relays the stream compared with direct: when its first event comes,
        and how far each later event (timed from the stream's first event) trails its
        direct pace. A gateway that buffered chunks would hold them back by seconds."""
        direct, other = self.arrivals[DIRECT], self.arrivals[name]
        if not direct or not other:
            return PacingLag(float("nan"), float("nan"), float("nan"))
        extra = [_ms((o - other[0]) - (d - direct[0])) for d, o in zip(direct, other, strict=False)]
        return PacingLag(_ms(other[0] - direct[0]), med(extra), max(extra))

    @property
    def event_ms(self) -> float:
        """The pace: milliseconds between two events of the direct stream, on average."""
        direct = self.arrivals[DIRECT]
        return _ms(direct[-1] - direct[0]) / max(1, len(direct) - 1)


@dataclass(frozen=True)
class PacingLag:
    first_ms: float
    median_ms: float
    max_ms: float


def pacing_test(targets: dict[str, Target]) -> Pacing:
    """One slow stream per target, all at once (nginx paces each alike)."""

    async def all_at_once() -> list[list[probe.Exchange]]:
        import asyncio

        return list(
            await asyncio.gather(
                *(probe.sequential(t.slow, SLOW_BODY, t.token, 1) for t in targets.values())
            )
        )

    results = probe.run(all_at_once())
    arrivals, reads = {}, {}
    for name, (exchange,) in zip(targets, results, strict=True):
        if exchange.status != 200 or exchange.error:
            raise procs.BenchError(
                f"{name}: slow stream failed: {exchange.status} {exchange.error}"
            )
        arrivals[name] = exchange.events
        reads[name] = exchange.reads
    return Pacing(arrivals, reads)


# --------------------------------------------------------------------------------------
# wrk loads.
# --------------------------------------------------------------------------------------

Runs = dict[tuple[str, str], list[wrk.WrkResult]]


@dataclass(frozen=True)
class Load:
    name: str
    connections: int
    targets: tuple[str, ...]
    script: Path = wrk.POST_SCRIPT
    stream: bool = False


class PendingWatcher:
    """Polls metergate's /readyz (ledger_pending_rows) every 0.5 s while loads run."""

    def __init__(self, base: str) -> None:
        self.url = base + "/readyz"
        self.max_pending = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(OSError, ValueError):
                answer = procs.http(self.url, timeout=5)
                pending = int(orjson.loads(answer.body).get("ledger_pending_rows", 0))
                self.max_pending = max(self.max_pending, pending)
                self.samples += 1

    @contextlib.contextmanager
    def running(self) -> Iterator[PendingWatcher]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


def run_loads(
    targets: dict[str, Target], loads: list[Load], args: argparse.Namespace, cpus: str | None
) -> Runs:
    """Every (load, target) `args.runs` times, interleaved: noise hits every target alike."""
    results: Runs = {}
    for index in range(args.runs):
        for load in loads:
            for name in load.targets:
                target = targets[name]
                url = target.stream if load.stream else target.unary
                result = wrk.run(
                    url,
                    connections=load.connections,
                    seconds=args.duration,
                    token=target.token,
                    cpus=cpus,
                    script=load.script,
                )
                results.setdefault((name, load.name), []).append(result)
                print(
                    f"run {index + 1}/{args.runs} {load.name:<28} {name:<10} "
                    f"{result.rps:>9.0f}/s p50 {result.p50_ms or 0:.3f} ms "
                    f"p99 {result.p99_ms or 0:.3f} ms errors {result.errors}",
                    flush=True,
                )
    return results


def median_of(results: Runs, name: str, load: str, attribute: str) -> float:
    return med([float(getattr(r, attribute)) for r in results[(name, load)]])


def half_load_connections(
    target: Target, max_rps: float, seconds: int, cpus: str | None
) -> tuple[int, list[tuple[int, float]]]:
    """The wrk connection count whose throughput is closest to half of `max_rps`."""
    tried: list[tuple[int, float]] = []
    for connections in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48):
        result = wrk.run(
            target.unary, connections=connections, seconds=seconds, token=target.token, cpus=cpus
        )
        tried.append((connections, result.rps))
        if result.rps >= 0.5 * max_rps:
            break
    best = min(tried, key=lambda item: abs(item[1] - 0.5 * max_rps))
    return best[0], tried


# --------------------------------------------------------------------------------------
# Streaming time to first chunk.
# --------------------------------------------------------------------------------------


@dataclass
class TtftRun:
    p50_ms: float
    p99_ms: float
    total_p50_ms: float
    complete: int
    count: int


def ttft_runs(
    targets: dict[str, Target], names: list[str], args: argparse.Namespace
) -> dict[str, list[TtftRun]]:
    out: dict[str, list[TtftRun]] = {name: [] for name in names}
    for name in names:  # warm-up: connections, caches, the gateway's pool
        target = targets[name]
        probe.run(probe.sequential(target.stream, STREAM_BODY, target.token, 50))
    for index in range(args.runs):
        for name in names:
            target = targets[name]
            exchanges = probe.run(
                probe.sequential(target.stream, STREAM_BODY, target.token, args.ttft_requests)
            )
            good = [
                e
                for e in exchanges
                if e.status == 200
                and e.error is None
                and e.first_event is not None
                and b"[DONE]" in e.body
            ]
            firsts = [_ms(e.first_event) for e in good if e.first_event is not None]
            totals = [_ms(e.done) for e in good if e.done is not None]
            run = TtftRun(
                probe.percentile(firsts, 50) if firsts else float("nan"),
                probe.percentile(firsts, 99) if firsts else float("nan"),
                probe.percentile(totals, 50) if totals else float("nan"),
                len(good),
                len(exchanges),
            )
            out[name].append(run)
            print(
                f"run {index + 1}/{args.runs} first chunk, 1 connection  {name:<10} "
                f"p50 {run.p50_ms:.3f} ms p99 {run.p99_ms:.3f} ms "
                f"({run.complete}/{run.count} complete)",
                flush=True,
            )
    return out


# --------------------------------------------------------------------------------------
# Profile.
# --------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    profile: profile.Profile
    rps: float
    raw: Path
    def_lines: dict[tuple[str, str], int] = field(default_factory=dict)


def profile_gateway(
    target: Target, args: argparse.Namespace, cpus: str | None, out_dir: Path
) -> ProfileResult:
    assert target.pid is not None
    raw = out_dir / "metergate-profile.raw.txt"
    recorder = profile.start(
        profile.py_spy(sys.executable), target.pid, args.profile_seconds, raw, cpus
    )
    time.sleep(0.5)  # py-spy attaches
    result = wrk.run(
        target.unary,
        connections=args.connections,
        seconds=args.profile_seconds,
        token=target.token,
        cpus=cpus,
    )
    profile.finish(recorder, raw)
    analysed = profile.analyse(raw, top=40)
    return ProfileResult(analysed, result.rps, raw, def_lines(analysed))


def def_lines(analysed: profile.Profile) -> dict[tuple[str, str], int]:
    """Where each sampled metergate function is defined (src/FILE), for file:line."""
    found = {}
    for (function, file), _ in analysed.inclusive:
        source = REPO / "src" / file
        if not file.startswith("metergate/") or not source.exists():
            continue
        name = function.split(".")[-1]
        pattern = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(name)}\b")
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if pattern.match(line):
                found[(function, file)] = number
                break
    return found


# --------------------------------------------------------------------------------------
# Checks at the end of the main gateway's life.
# --------------------------------------------------------------------------------------


def final_checks(
    exit_code: int, log: Path, ledger: Path, metered: dict[str, float], wrk_errors: int
) -> list[Check]:
    text = log.read_text(errors="replace")
    problems = [
        line
        for line in text.splitlines()
        if "Traceback" in line or " ERROR " in line or "CRITICAL" in line
    ]
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute("SELECT count(*) FROM requests WHERE outcome = 'success'").fetchone()[0]
    others = {k: v for k, v in metered.items() if k != "success" and v}
    return [
        Check(
            "wrk saw no non-2xx answer or socket error from metergate",
            not wrk_errors,
            f"{wrk_errors}",
        ),
        Check(
            "no request metered with an outcome other than success",
            not others,
            ", ".join(f"{k}: {v:.0f}" for k, v in others.items()),
        ),
        Check(
            "metergate shut down gracefully on SIGTERM (ledger flushed)",
            exit_code in (0, -15) and "ledger flushed" in text,
            f"exit status {exit_code}",
        ),
        Check("no error or traceback in metergate's log", not problems, "; ".join(problems[:3])),
        Check(
            "the ledger holds one success row per metered success",
            rows == metered.get("success", 0),
            f"{rows} rows, {metered.get('success', 0):.0f} metered",
        ),
    ]


# --------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Everything measured, for the report."""

    names: list[str]
    unary: Runs = field(default_factory=dict)
    half: Runs = field(default_factory=dict)
    half_connections: dict[str, int] = field(default_factory=dict)
    calibration: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    streams: Runs = field(default_factory=dict)
    ttft: dict[str, list[TtftRun]] = field(default_factory=dict)
    memory: dict[str, MemoryResult] = field(default_factory=dict)
    pacing: Pacing | None = None
    profiled: ProfileResult | None = None
    scrape: scrape.ScrapeResult | None = None
    scrape_raw: Path | None = None
    micro: list[tuple[str, float, float]] = field(default_factory=list)
    ledger: list[ledger_rate.LedgerRate] = field(default_factory=list)
    postgres: str = "not measured"
    max_pending: int = 0
    pending_samples: int = 0
    checks: list[Check] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)
    litellm_versions: dict[str, str] = field(default_factory=dict)
    litellm_install: str = ""
    configs: dict[str, str] = field(default_factory=dict)


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def ratio(a: float, b: float, digits: int = 3) -> str:
    """`a / b` as `1.234x`, or n/a when b is zero or a measurement is missing."""
    if not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.{digits}f}x"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


SAT = "saturation"
ONE = "1 connection"


def summary_rows(
    o: Outcome, args: argparse.Namespace
) -> tuple[list[list[str]], list[tuple[str, bool, str]]]:
    """The results table and the targets (label, met, evidence)."""
    rows: list[list[str]] = []
    targets: list[tuple[str, bool, str]] = []
    has_lite = LITELLM in o.names

    def v(name: str, load: str, attribute: str, runs: Runs) -> float:
        return median_of(runs, name, load, attribute) if (name, load) in runs else float("nan")

    floor_cells: dict[int, str] = {}  # row index -> the floor's value, where measured
    rps = {n: v(n, SAT, "rps", o.unary) for n in [*o.names, FLOOR_LABEL]}
    floor_cells[len(rows)] = _f(rps[FLOOR_LABEL], 0)
    rows.append(
        [
            f"non-streaming requests/s, 1 worker (wrk -c{args.connections})",
            _f(rps[DIRECT], 0),
            _f(rps[METERGATE], 0),
            _f(rps.get(LITELLM, float("nan")), 0),
            ratio(rps[METERGATE], rps[DIRECT]),
            ratio(rps[METERGATE], rps.get(LITELLM, float("nan")), 1),
        ]
    )
    targets.append(
        (
            "≥ 5,000 non-streaming requests/s (one worker, all features on)",
            rps[METERGATE] >= 5000,
            f"{rps[METERGATE]:,.0f}/s; floor (bare Python proxy) {rps[FLOOR_LABEL]:,.0f}/s "
            f"= {ratio(rps[METERGATE], rps[FLOOR_LABEL], 2)} of the floor",
        )
    )
    if has_lite:
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
        floor_cells[len(rows)] = _f(v(FLOOR_LABEL, ONE, field_name, o.unary))
        rows.append(
            [
                f"{label} latency, 1 connection (ms)",
                _f(values[DIRECT]),
                _f(values[METERGATE]),
                _f(values.get(LITELLM, float("nan"))),
                f"+{values[METERGATE] - values[DIRECT]:.3f} ms",
                f"+{values[LITELLM] - values[DIRECT]:.3f} ms" if has_lite else "n/a",
            ]
        )
        if label == "p50":
            added = round(values[METERGATE] - values[DIRECT], 3)  # wrk's resolution: 10 µs
            targets.append(
                ("added latency ≤ 0.3 ms p50 at 1 connection", added <= 0.3, f"+{added:.3f} ms")
            )
    for field_name, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        cells, added = [], {}
        for name in (METERGATE, LITELLM):
            if name not in o.half_connections:
                continue
            load = half_load_name(o.half_connections[name])
            through = v(name, load, field_name, o.half)
            direct = v(DIRECT, load, field_name, o.half)
            added[name] = through - direct
            cells.append((name, through, direct, o.half_connections[name]))
        by = {name: (through, direct, c) for name, through, direct, c in cells}
        m = by[METERGATE]
        lite = by.get(LITELLM)
        floor_load = half_load_name(o.half_connections[METERGATE])
        floor_cells[len(rows)] = f"{_f(v(FLOOR_LABEL, floor_load, field_name, o.half))} (-c{m[2]})"
        rows.append(
            [
                f"{label} latency at ~half of max load (ms); -c = gateway's half-load count",
                f"{_f(m[1])} (-c{m[2]})" + (f" / {_f(lite[1])} (-c{lite[2]})" if lite else ""),
                f"{_f(m[0])} (-c{m[2]})",
                f"{_f(lite[0])} (-c{lite[2]})" if lite else "n/a",
                f"+{added[METERGATE]:.3f} ms",
                f"+{added[LITELLM]:.3f} ms" if lite else "n/a",
            ]
        )
        if label == "p99":
            targets.append(
                (
                    "added latency ≤ 2 ms p99 at half of max load",
                    added[METERGATE] <= 2.0,
                    f"+{added[METERGATE]:.3f} ms",
                )
            )
    ttft = {
        n: (med([r.p50_ms for r in o.ttft[n]]), med([r.p99_ms for r in o.ttft[n]])) for n in o.ttft
    }
    for index, label in ((0, "p50"), (1, "p99")):
        rows.append(
            [
                f"stream: time to first chunk {label}, 1 connection (ms)",
                _f(ttft[DIRECT][index]),
                _f(ttft[METERGATE][index]),
                _f(ttft[LITELLM][index]) if has_lite else "n/a",
                f"+{ttft[METERGATE][index] - ttft[DIRECT][index]:.3f} ms",
                f"+{ttft[LITELLM][index] - ttft[DIRECT][index]:.3f} ms" if has_lite else "n/a",
            ]
        )
    added_ttft = ttft[METERGATE][0] - ttft[DIRECT][0]
    targets.append(
        (
            "streaming: added time to first chunk ≤ 0.5 ms p50",
            added_ttft <= 0.5,
            f"+{added_ttft:.3f} ms",
        )
    )
    chunks = {n: v(n, "streams", "rps", o.streams) * upstream.STREAM_CHUNKS for n in o.names}
    rows.append(
        [
            f"stream: chunks/s (wrk -c{args.connections}, 50-chunk streams)",
            _f(chunks[DIRECT], 0),
            _f(chunks[METERGATE], 0),
            _f(chunks[LITELLM], 0) if has_lite else "n/a",
            ratio(chunks[METERGATE], chunks[DIRECT]),
            ratio(chunks[METERGATE], chunks.get(LITELLM, float("nan")), 1),
        ]
    )
    if o.pacing is not None:
        pacing = o.pacing
        lag = {n: pacing.lag_ms(n) for n in pacing.arrivals if n != DIRECT}

        def lags(name: str) -> str:
            if name not in lag:
                return "n/a"
            found = lag[name]
            return f"+{_f(found.first_ms, 1)} / {_f(found.median_ms, 1)} / {_f(found.max_ms, 1)}"

        rows.append(
            [
                "slow stream (~10 s): first event later than direct / later events behind "
                "their direct pace, median / max (ms)",
                f"{len(pacing.arrivals[DIRECT])} events, 1 per {pacing.event_ms:.0f} ms, "
                f"{pacing.reads[DIRECT]} reads",
                lags(METERGATE) + f", {pacing.reads[METERGATE]} reads",
                lags(LITELLM) + f", {pacing.reads.get(LITELLM, 0)} reads" if has_lite else "n/a",
                "",
                "",
            ]
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
    if o.memory:
        mem = o.memory
        rows.append(
            [
                "RSS idle (MiB, VmRSS)",
                "",
                _f(mem[METERGATE].idle.rss_mib, 1),
                _f(mem[LITELLM].idle.rss_mib, 1) if LITELLM in mem else "n/a",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"peak RSS with {args.streams:,} concurrent slow streams (MiB)",
                "",
                _f(mem[METERGATE].peak_mib, 1) + streams_note(mem[METERGATE]),
                (_f(mem[LITELLM].peak_mib, 1) + streams_note(mem[LITELLM]))
                if LITELLM in mem
                else "n/a",
                "",
                ratio(mem[LITELLM].peak_mib, mem[METERGATE].peak_mib, 1) + " less"
                if LITELLM in mem
                else "n/a",
            ]
        )
        m = mem[METERGATE]
        targets.append(
            (
                f"≤ 100 MB RSS with {args.streams:,} concurrent streams",
                m.peak_mib * 1.048576 <= 100 and m.peak_open >= args.streams,
                f"peak {m.peak_mib:.1f} MiB = {m.peak_mib * 1.048576:.1f} MB, "
                f"{m.peak_open} open at once, {m.streams_ok} completed",
            )
        )
    if o.scrape is not None:
        s = o.scrape
        rows.append(
            [
                f"/metrics scrape, {scrape.MODELS} models x {scrape.KEYS} keys (ms, median of "
                f"{len(s.scrape_ms)})",
                "",
                _f(s.median_ms, 1),
                "n/a",
                "",
                "",
            ]
        )
        targets.append(
            (
                "/metrics scrape ≤ 50 ms at 50 models x 200 keys",
                s.median_ms <= 50,
                f"{s.median_ms:.1f} ms for {s.series:,} samples, {s.body_bytes / 1e6:.1f} MB",
            )
        )
    for rate in o.ledger:
        rows.append(
            [
                f"ledger rows/s, LedgerWriter on {rate.backend} ({rate.rows:,} rows)",
                "",
                _f(rate.rows_per_second, 0),
                "n/a",
                "",
                "",
            ]
        )
    rows.append(
        [
            "ledger rows pending, max under the wrk loads (sampled every 0.5 s)",
            "",
            f"{o.max_pending:,}",
            "n/a",
            "",
            "",
        ]
    )
    for index, row in enumerate(rows):
        row.insert(4, floor_cells.get(index, ""))
    return rows, targets


def streams_note(memory: MemoryResult) -> str:
    return (
        f" ({memory.streams_ok:,} completed, first event p50 "
        f"{memory.first_event_ms / 1000:.2f} s, stream p50 {memory.duration_s:.1f} s)"
    )


def half_load_name(connections: int) -> str:
    return f"half load (-c{connections})"


def render(o: Outcome, args: argparse.Namespace, layout: CpuLayout) -> str:
    rows, targets = summary_rows(o, args)
    parts = [
        "# metergate benchmark suite",
        "",
        "One worker per gateway, every metergate feature on (key auth, metrics, SQLite "
        "ledger, prices, a hard budget). nginx answers fixed OpenAI completions. "
        f"Medians of {args.runs} interleaved runs of {args.duration} s unless said otherwise. "
        "Reproduce: `.venv/bin/python bench/suite.py`.",
        "",
        table(
            [
                "workload",
                "direct (nginx)",
                "metergate",
                "LiteLLM",
                "floor (minimal proxy)",
                "metergate vs direct",
                "metergate vs LiteLLM (LiteLLM vs direct for latency)",
            ],
            rows,
            "lrrrrrr",
        ),
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
    if o.profiled is not None:
        parts += profile_section(o.profiled)
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
    if o.litellm_versions:
        parts.append(
            "- LiteLLM venv: "
            + ", ".join(f"{k} {v}" for k, v in o.litellm_versions.items())
            + f" ({o.litellm_install})"
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
        "- LiteLLM: `" + " ".join(litellm.REQUIREMENTS) + "` in `bench/.litellm-venv`, "
        "`litellm --config FILE --num_workers 1`; master key, per-model prices, "
        "`callbacks: [prometheus]`; no virtual keys, spend logs nor budgets (they need its "
        "Prisma database, whose engines cannot be downloaded here), so it does less per "
        "request than metergate (see `bench/benchlib/litellm.py`).",
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


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


def step(title: str) -> None:
    print(f"\n== {title} ({time.strftime('%H:%M:%S')})", flush=True)


def benchmark(args: argparse.Namespace, workdir: Path, layout: CpuLayout, o: Outcome) -> None:
    other = layout.other
    with procs.Processes() as processes:
        step("starting nginx, metergate, LiteLLM and the floor proxy")
        nginx = upstream.start_nginx(processes, workdir, other)
        config = gw.write_config(workdir, nginx.port)
        key = gw.create_key(config)
        gateway = gw.start_gateway(processes, config, layout.gateway)
        o.configs["metergate config"] = config.read_text()
        chat = gateway.base + "/v1/chat/completions"  # the body's model picks the location
        targets = {
            DIRECT: Target(
                DIRECT,
                DIRECT_TOKEN,
                nginx.base + upstream.CHAT_PATH,
                nginx.base + upstream.STREAM_PATH,
                nginx.base + upstream.SLOW_PATH,
            ),
            METERGATE: Target(METERGATE, key, chat, chat, chat, gateway.process.popen.pid),
        }
        if not args.no_litellm:
            lite_config = litellm.write_config(workdir, nginx.port)
            o.configs["LiteLLM config"] = lite_config.read_text()
            lite = litellm.start(processes, lite_config, layout.gateway)
            chat = lite.base + "/v1/chat/completions"
            targets[LITELLM] = Target(
                LITELLM, litellm.MASTER_KEY, chat, chat, chat, lite.process.popen.pid
            )
        floor = start_floor(processes, workdir, nginx.base + upstream.CHAT_PATH, layout.gateway)
        o.checks += verify(targets, floor)
        names = list(targets)
        gateways = [n for n in names if n != DIRECT]

        step(f"memory: idle, then {args.streams:,} slow streams at once")
        for name in gateways:
            o.memory[name] = result = memory_test(targets[name], args.streams)
            print(
                f"{name}: idle {result.idle.rss_mib:.1f} MiB, peak {result.peak_mib:.1f} MiB, "
                f"{result.peak_open} open at once, {result.streams_ok} completed, "
                f"first event p50 {result.first_event_ms:.1f} ms",
                flush=True,
            )
        o.checks.append(
            Check(
                f"metergate completed all {args.streams:,} concurrent slow streams",
                o.memory[METERGATE].streams_ok == args.streams,
                f"{o.memory[METERGATE].streams_ok} completed",
            )
        )

        step("pacing: one slow stream per target, all at once")
        time.sleep(2)  # let the gateways close the 1,000 streams' connections first
        o.pacing = pacing_test(targets)

        all_targets = {**targets, FLOOR_LABEL: Target(FLOOR_LABEL, "x", floor, "", "")}
        with PendingWatcher(gateway.base).running() as watcher:
            step("non-streaming: warm-up, saturation and 1 connection")
            for target in all_targets.values():
                wrk.run(
                    target.unary,
                    connections=args.connections,
                    seconds=args.warmup,
                    token=target.token,
                    cpus=other,
                )
            loads = [
                Load(SAT, args.connections, tuple(all_targets)),
                Load(ONE, 1, tuple(all_targets)),
            ]
            o.unary = run_loads(all_targets, loads, args, other)

            step("non-streaming: about half of max load")
            half_loads: dict[int, list[str]] = {}
            for name in gateways:
                max_rps = median_of(o.unary, name, SAT, "rps")
                connections, tried = half_load_connections(targets[name], max_rps, 2, other)
                o.half_connections[name] = connections
                o.calibration[name] = tried
                half_loads.setdefault(connections, [DIRECT]).append(name)
            # The floor at metergate's count: what any Python proxy shows at that load here.
            half_loads[o.half_connections[METERGATE]].append(FLOOR_LABEL)
            o.half = run_loads(
                all_targets,
                [Load(half_load_name(c), c, tuple(ns)) for c, ns in half_loads.items()],
                args,
                other,
            )

            step("streaming: time to first chunk (probe) and chunks/s (wrk)")
            o.ttft = ttft_runs(targets, names, args)
            for target in targets.values():
                wrk.run(
                    target.stream,
                    connections=args.connections,
                    seconds=args.warmup,
                    token=target.token,
                    cpus=other,
                    script=wrk.STREAM_SCRIPT,
                )
            o.streams = run_loads(
                targets,
                [Load("streams", args.connections, tuple(names), wrk.STREAM_SCRIPT, True)],
                args,
                other,
            )
            o.max_pending, o.pending_samples = watcher.max_pending, watcher.samples

        step(f"profile: py-spy on metergate for {args.profile_seconds} s under wrk -c64")
        out_dir = BENCH / "results" / "tmp"
        out_dir.mkdir(parents=True, exist_ok=True)
        o.profiled = profile_gateway(targets[METERGATE], args, other, out_dir)

        metered = gw.requests_by_outcome(gateway)
        wrk_errors = sum(
            r.errors
            for runs in (o.unary, o.half, o.streams)
            for (name, _), results in runs.items()
            for r in results
            if name == METERGATE
        )
        exit_code = processes.stop(gateway.process)
        o.checks += final_checks(
            exit_code, gateway.process.log, workdir / "ledger.db", metered, wrk_errors
        )
        for name in (LITELLM, FLOOR_LABEL):
            errors = sum(r.errors for (n, _), rs in o.unary.items() if n == name for r in rs)
            if name in o.names or name == FLOOR_LABEL:
                o.checks.append(
                    Check(
                        f"wrk saw no error from {NAMES[name]}",
                        not errors,
                        str(errors),
                        required=False,
                    )
                )
        for entry in list(processes.started):
            if entry.name in ("litellm", "floor"):
                processes.stop(entry)

        step("/metrics scrape with 50 models x 200 keys")
        o.scrape_raw = out_dir / "scrape-profile.raw.txt"
        o.scrape, scrape_gateway = scrape.run(
            processes, workdir, layout.gateway, profile_to=o.scrape_raw, profiler_cpus=other
        )
        processes.stop(scrape_gateway.process)
        print(f"scrape median {o.scrape.median_ms:.1f} ms, {o.scrape.series:,} samples", flush=True)

    step(f"ledger: {args.ledger_rows:,} rows through LedgerWriter")
    o.ledger.append(ledger_rate.sqlite(args.ledger_rows))
    if not args.no_postgres:
        result, o.postgres = ledger_rate.postgresql(args.ledger_rows)
        if result is not None:
            o.ledger.append(result)
    for rate in o.ledger:
        print(f"{rate.backend}: {rate.rows_per_second:,.0f} rows/s", flush=True)

    step("micro-benchmarks of the hot path's optimisations")
    o.micro = micro.run()


def environment(layout: CpuLayout) -> list[tuple[str, str]]:
    env = report.environment(layout.describe())
    extra = {
        "py-spy": procs.tool_version([profile.py_spy(sys.executable), "--version"]),
        "uvicorn settings": "metergate serve: uvloop, httptools, access log off, 1 worker",
    }
    return [*env, *extra.items()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_exit()
    procs.ensure_tools()
    names = [DIRECT, METERGATE] + ([] if args.no_litellm else [LITELLM])
    o = Outcome(names)
    if not args.no_litellm:
        o.litellm_install = litellm.ensure_installed()
        o.litellm_versions = litellm.versions()
    layout = cpu_layout(not args.no_pin)
    if layout.other is not None:  # the probes run here: keep them off the gateways' CPU
        os.sched_setaffinity(0, {int(c) for c in layout.other.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-suite-"))
    workdir.chmod(0o755)  # nginx's worker runs as `nobody` when started as root
    passed = False
    started = time.monotonic()
    try:
        o.env = environment(layout)  # the commit and tree as they are when the run starts
        benchmark(args, workdir, layout, o)
        o.env.append(("suite duration", f"{(time.monotonic() - started) / 60:.1f} min"))
        text = render(o, args, layout)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print("\n" + text)
        print(f"written to {args.output}")
        passed = all(c.ok for c in o.checks if c.required)
        if not passed:
            print("benchmark FAILED: see the checks above", file=sys.stderr)
    except procs.BenchError as error:
        print(f"benchmark FAILED: {error}", file=sys.stderr)
    finally:
        if passed and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work dir kept for inspection: {workdir}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
