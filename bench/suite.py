"""The whole metergate benchmark suite, against nginx, LiteLLM's proxy and Portkey's gateway.

    .venv/bin/python bench/suite.py [--duration 5] [--runs 3] [--output FILE]

One command, about 15 minutes (plus the peers' installs the first time). nginx answers
fixed OpenAI completions (plain, a 50-chunk SSE stream, and the same stream paced over
~10 s); each workload runs against nginx directly, through metergate (1 worker, every
feature on: key auth, metrics, SQLite ledger, prices, a hard budget), through LiteLLM's
proxy (1 worker, master key, Prometheus callback) and through Portkey's open-source
gateway (Node, headless), in the same run, runs interleaved, medians reported with their
ratios:

1. memory: RSS idle, and peak RSS with 1,000 slow streams open at once;
2. no buffering: one slow stream per target, at the same time: when each event arrives;
3. non-streaming requests/s at saturation (wrk -c64), and p50/p99 at 1 connection (also
   for bench/stack's minimal uvicorn + bare-client proxy: the floor of a Python proxy);
4. p50/p99 at about half of each gateway's max throughput (wrk with the connection count
   that gives it; direct measured at the same count); each gateway's RSS before and
   after these non-streaming loads;
5. streaming: time to first chunk at 1 connection (asyncio probe), chunks/s (wrk -c64);
6. a py-spy profile of metergate under the saturation load;
7. `/metrics` scrape time with 50 models x 200 keys of live series (its own gateway);
8. ledger rows/s of metergate's LedgerWriter on SQLite and PostgreSQL;
9. `serve --workers N` for N = 1, 2 (`--workers`): requests/s, latency, metrics and ledger
   exact, the multi-process `/metrics` scrape, SQLite with N writers, a worker's profile.

Writes a markdown report (`bench/results/suite.md`): tables, targets met or not, every
run, the profile's top, checks, versions and settings. Everything listens on 127.0.0.1,
every load is bounded in time, and every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from benchlib import gateway as gw
from benchlib import (
    ledger_rate,
    litellm,
    micro,
    native,
    portkey,
    probe,
    procfs,
    procs,
    profile,
    report,
    scrape,
    upstream,
    workers,
    wrk,
)
from benchlib.measure import half_load_connections, ttft_once
from benchlib.outcome import (
    ONE,
    SAT,
    MemoryResult,
    Outcome,
    Pacing,
    ProfileResult,
    Runs,
    TtftRun,
    half_load_name,
    med,
    median_of,
    ms,
)
from benchlib.procs import CpuLayout, cpu_layout
from benchlib.report import Check, outcomes_check
from benchlib.suite_report import render
from benchlib.targets import (
    DIRECT,
    DIRECT_TOKEN,
    FLOOR_LABEL,
    LITELLM,
    METERGATE,
    NAMES,
    PEERS,
    PORTKEY,
    SLOW_BODY,
    Target,
    start_floor,
    verify,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


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
    parser.add_argument("--no-portkey", action="store_true", help="skip Portkey")
    parser.add_argument(
        "--workers",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[1, 2],
        help="worker counts to compare, e.g. 1,2,4 (1,2); empty to skip: --workers ''",
    )
    parser.add_argument(
        "--client-cpus", type=int, default=1, help="CPUs kept for nginx + wrk in the workers step"
    )
    parser.add_argument("--no-postgres", action="store_true", help="ledger on SQLite only")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, ledger)")
    parser.add_argument(
        "--output", type=Path, default=BENCH / "results" / "suite.md", help="markdown report"
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------
# Starting the targets and checking they answer right.
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Memory and buffering (first, so that VmHWM has not yet seen the saturation runs).
# --------------------------------------------------------------------------------------


def memory_test(target: Target, streams: int) -> MemoryResult:
    assert target.pid is not None
    idle = procfs.memory(target.pid)
    sampler = procfs.Sampler(target.pid)
    exchanges = probe.run(
        probe.concurrent(
            target.slow,
            SLOW_BODY,
            target.token,
            streams,
            seconds=90,
            while_open=sampler.run,
            headers=target.headers("slow"),
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
        first_event_ms=ms(med([e.first_event for e in ok if e.first_event is not None] or [0])),
        duration_s=med([e.done for e in ok if e.done is not None] or [0]),
    )


def rss_mib(target: Target) -> float:
    return procfs.memory(target.pid).rss_mib if target.pid is not None else float("nan")


def pacing_test(targets: dict[str, Target]) -> Pacing:
    """One slow stream per target, all at once (nginx paces each alike)."""

    async def all_at_once() -> list[list[probe.Exchange]]:
        import asyncio

        return list(
            await asyncio.gather(
                *(
                    probe.sequential(t.slow, SLOW_BODY, t.token, 1, t.headers("slow"))
                    for t in targets.values()
                )
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
                kind = "stream" if load.stream else "unary"
                result = wrk.run(
                    target.stream if load.stream else target.unary,
                    connections=load.connections,
                    seconds=args.duration,
                    token=target.token,
                    cpus=cpus,
                    script=load.script,
                    headers=target.headers(kind),
                )
                results.setdefault((name, load.name), []).append(result)
                print(
                    f"run {index + 1}/{args.runs} {load.name:<28} {name:<10} "
                    f"{result.rps:>9.0f}/s p50 {result.p50_ms or 0:.3f} ms "
                    f"p99 {result.p99_ms or 0:.3f} ms errors {result.errors}",
                    flush=True,
                )
    return results


# --------------------------------------------------------------------------------------
# Streaming time to first chunk.
# --------------------------------------------------------------------------------------


def ttft_runs(
    targets: dict[str, Target], names: list[str], args: argparse.Namespace
) -> dict[str, list[TtftRun]]:
    out: dict[str, list[TtftRun]] = {name: [] for name in names}
    for name in names:  # warm-up: connections, caches, the gateway's pool
        ttft_once(targets[name], 50)
    for index in range(args.runs):
        for name in names:
            run = ttft_once(targets[name], args.ttft_requests)
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


def native_profiles(
    targets: dict[str, Target],
    args: argparse.Namespace,
    cpus: str | None,
    out_dir: Path,
) -> tuple[list[native.NativeProfile], str]:
    """`benchlib.native` on each target, one after the other."""
    missing = native.missing_tools()
    if missing:
        return [], f"{' and '.join(missing)} not installed"
    found = []
    for name, target in targets.items():
        assert target.pid is not None
        try:
            load = native.Load(target.unary, target.token, args.duration, args.connections, cpus)
            result = native.measure(name, target.pid, load, out_dir)
        except (RuntimeError, subprocess.SubprocessError) as exc:
            return found, f"perf or strace failed: {exc}"
        found.append(result)
        print(
            f"{name}: {result.cpu_us:.0f} µs CPU per request, "
            + ", ".join(f"{part} {100 * share:.0f}%" for part, share in result.parts[:3]),
            flush=True,
        )
    return found, ""


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


UNMEASURED_WRK_RUNS = 6  # against metergate, besides the measured and calibration runs


def final_checks(
    exit_code: int,
    log: Path,
    ledger: Path,
    metered: dict[str, float],
    wrk_errors: int,
    wrk_runs: int,
    connections: int,
) -> list[Check]:
    """`wrk_runs`: at least as many as were made against metergate, each with at most
    `connections`."""
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
        outcomes_check(others, wrk_runs * connections),
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
# The run.
# --------------------------------------------------------------------------------------


def step(title: str) -> None:
    print(f"\n== {title} ({time.strftime('%H:%M:%S')})", flush=True)


def benchmark(args: argparse.Namespace, workdir: Path, layout: CpuLayout, o: Outcome) -> None:
    other = layout.other
    with procs.Processes() as processes:
        step("starting nginx, metergate, the peers and the floor proxy")
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
        if not args.no_portkey:
            gateway_portkey = portkey.start(processes, workdir, layout.gateway)
            chat = gateway_portkey.base + "/v1/chat/completions"
            egress = portkey.EgressWatch(gateway_portkey.process.popen.pid).start()
            targets[PORTKEY] = Target(
                PORTKEY,
                portkey.TOKEN,
                chat,
                chat,
                chat,
                gateway_portkey.process.popen.pid,
                {kind: portkey.headers(nginx.port, kind) for kind in portkey.LOCATIONS},
            )
        floor, floor_pid = start_floor(
            processes, workdir, nginx.base + upstream.CHAT_PATH, layout.gateway
        )
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

        all_targets = {**targets, FLOOR_LABEL: Target(FLOOR_LABEL, "x", floor, "", "", floor_pid)}
        with PendingWatcher(gateway.base).running() as watcher:
            step("non-streaming: warm-up, saturation and 1 connection")
            resident = {name: rss_mib(targets[name]) for name in gateways}
            for target in all_targets.values():
                wrk.run(
                    target.unary,
                    connections=args.connections,
                    seconds=args.warmup,
                    token=target.token,
                    cpus=other,
                    headers=target.headers("unary"),
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
            for name, before in resident.items():  # what the non-streaming loads added
                o.loaded_rss_mib[name] = (before, rss_mib(targets[name]))

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
                    headers=target.headers("stream"),
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

        step("below Python: perf by shared object and strace -c, metergate and the floor")
        o.native, o.native_skipped = native_profiles(
            {METERGATE: targets[METERGATE], FLOOR_LABEL: all_targets[FLOOR_LABEL]},
            args,
            other,
            out_dir,
        )

        metered = gw.requests_by_outcome(gateway)
        measured = [
            r
            for runs in (o.unary, o.half, o.streams)
            for (name, _), results in runs.items()
            for r in results
            if name == METERGATE
        ]
        wrk_errors = sum(r.errors for r in measured)
        # and the warm-ups, the calibration, the profile and the below-Python views
        wrk_runs = len(measured) + len(o.calibration.get(METERGATE, ())) + UNMEASURED_WRK_RUNS
        exit_code = processes.stop(gateway.process)
        o.checks += final_checks(
            exit_code,
            gateway.process.log,
            workdir / "ledger.db",
            metered,
            wrk_errors,
            wrk_runs,
            args.connections,
        )
        if PORTKEY in targets:
            remote = egress.stop()
            o.checks.append(
                Check(
                    "Portkey connected to nothing but loopback (its sockets sampled every "
                    f"0.5 s while it ran, {egress.samples} samples)",
                    not remote,
                    ", ".join(remote),
                )
            )
        for name in (*PEERS, FLOOR_LABEL):
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
            if entry.name in ("litellm", "portkey", "floor"):
                processes.stop(entry)

        step("/metrics scrape with 50 models x 200 keys")
        o.scrape_raw = out_dir / "scrape-profile.raw.txt"
        o.scrape, scrape_gateway = scrape.run(
            processes, workdir, layout.gateway, profile_to=o.scrape_raw, profiler_cpus=other
        )
        processes.stop(scrape_gateway.process)
        print(f"scrape median {o.scrape.median_ms:.1f} ms, {o.scrape.series:,} samples", flush=True)

        if args.workers:
            step(f"workers: serve --workers {' / '.join(map(str, args.workers))}")
            o.workers, checks = workers.measure(
                processes,
                workdir,
                args.workers,
                cpus=list(layout.cpus),
                runs=args.runs,
                duration=args.duration,
                warmup=args.warmup,
                connections=args.connections,
                client_cpus=args.client_cpus,
                pin=layout.gateway is not None,
                profile_seconds=args.profile_seconds,
                out_dir=out_dir,
                ledger_rows=args.ledger_rows,
                scrapes=True,
            )
            o.checks += checks

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
    profile.ensure_installed(sys.executable)
    names = [DIRECT, METERGATE] + [
        name for name, skip in ((LITELLM, args.no_litellm), (PORTKEY, args.no_portkey)) if not skip
    ]
    o = Outcome(names)
    if not args.no_litellm:
        o.peer_install[LITELLM] = litellm.ensure_installed()
        o.peer_versions[LITELLM] = litellm.versions()
    if not args.no_portkey:
        o.peer_install[PORTKEY] = portkey.ensure_installed()
        o.peer_versions[PORTKEY] = portkey.versions()
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
        passed = report.publish(render(o, args), args.output, o.checks)
        if not passed:
            print("benchmark FAILED: see the checks above", file=sys.stderr)
    except procs.BenchError as error:
        print(f"benchmark FAILED: {error}", file=sys.stderr)
    return procs.finish(workdir, passed, args.keep)


if __name__ == "__main__":
    sys.exit(main())
