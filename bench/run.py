"""Benchmark what metergate adds to a request, against nginx serving fixed OpenAI answers.

    .venv/bin/python bench/run.py [--duration 10] [--connections 64] [--runs 3]

Measures, with wrk, the same POST /v1/chat/completions sent (a) straight to nginx and
(b) through metergate (1 worker, every feature on, as in bench/suite.py): requests/s at
saturation and p50/p99 latency at one connection. Each measurement runs `--runs` times, direct and
gateway interleaved so that noise on the machine hits both alike; medians are reported.
Everything listens on 127.0.0.1 and every process started here is stopped on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchlib import gateway as gw
from benchlib import procs, report, upstream, wrk
from benchlib.report import Check, Row

BENCH = Path(__file__).resolve().parent
DIRECT_TOKEN = "sk-bench"  # what the gateway itself sends upstream; nginx ignores it
REQUEST = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
EXPECTED_COST_HEADER = "0.000025000"  # 11 input x $1/M + 7 output x $2/M


@dataclass(frozen=True)
class Load:
    """One way of loading a target: a name for the report and wrk's connection count."""

    name: str
    connections: int


@dataclass(frozen=True)
class CpuLayout:
    """Which CPUs (taskset lists) each party may use; None leaves it to the scheduler."""

    gateway: str | None
    upstream: str | None
    client: str | None

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned"
        return (
            f"metergate on CPU {self.gateway}; nginx on CPU {self.upstream}; "
            f"wrk on CPU {self.client} (the same for direct runs: the gateway's CPU idles then)"
        )


def cpu_layout(pin: bool) -> CpuLayout:
    """Give the gateway (the thing measured) a CPU of its own; nginx and wrk share the rest.

    On 2 CPUs nginx and wrk share one: both are cheap next to a Python gateway, and direct
    runs use exactly the same placement, so the comparison stays like for like.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
        return CpuLayout(None, None, None)
    rest = cpus[1:]
    client = rest[1:] or rest
    return CpuLayout(str(cpus[0]), str(rest[0]), ",".join(map(str, client)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    parser.add_argument("--connections", type=int, default=64, help="saturation load (64)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per measurement (3)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per target (3)")
    parser.add_argument(
        "--output", type=Path, default=BENCH / "results" / "latest.md", help="markdown report"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, ledger)")
    return parser.parse_args(argv)


def verify(targets: dict[str, str], stream_url: str, key: str) -> list[Check]:
    """Fail loudly unless both targets answer 200 with the fixed body; check stream relay too."""
    auth = {"direct": DIRECT_TOKEN, "gateway": key}
    for name, url in targets.items():
        answer = procs.http(url, REQUEST, _headers(auth[name]))
        if answer.status != 200 or answer.body != upstream.CHAT_BODY:
            raise procs.BenchError(
                f"{name} answered {answer.status} with {answer.body[:500]!r}; "
                f"expected 200 with {upstream.CHAT_BODY!r}"
            )
    checks = [Check("direct and gateway answer 200 with the upstream body byte for byte", True)]
    cost = procs.http(targets["gateway"], REQUEST, _headers(key)).headers.get(
        "x-metergate-cost-usd"
    )
    checks.append(
        Check(
            "gateway prices the request at 11 x $1/M + 7 x $2/M",
            cost == EXPECTED_COST_HEADER,
            f"x-metergate-cost-usd: {cost}",
        )
    )
    body = REQUEST.replace(b'"bench"', b'"bench-stream"').replace(
        b"}]}", b'}],"stream":true,"stream_options":{"include_usage":true}}'
    )
    streamed = procs.http(stream_url, body, _headers(key))
    checks.append(
        Check(
            "gateway relays the 50-chunk SSE stream unchanged (measured by bench/suite.py)",
            streamed.status == 200 and streamed.body == upstream.STREAM_BODY,
            f"HTTP {streamed.status}, {len(streamed.body)} of {len(upstream.STREAM_BODY)} bytes",
            required=False,
        )
    )
    return checks


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


Results = dict[tuple[str, str], list[wrk.WrkResult]]


def measure(
    targets: dict[str, str],
    loads: list[Load],
    args: argparse.Namespace,
    run: Callable[..., wrk.WrkResult],
) -> tuple[Results, int]:
    """Warm each target up, then run every (load, target) `args.runs` times, interleaved.

    Returns the results and how many requests the gateway completed, warm-up included.
    """
    gateway_requests = 0
    for name, url in targets.items():
        warm = run(name, url, Load("warm-up", args.connections), args.warmup)
        gateway_requests += warm.requests if name == "gateway" else 0
    results: Results = {}
    for index in range(args.runs):
        for load in loads:
            for name, url in targets.items():
                result = run(name, url, load, args.duration)
                results.setdefault((name, load.name), []).append(result)
                gateway_requests += result.requests if name == "gateway" else 0
                print(
                    f"run {index + 1}/{args.runs} {load.name:<24} {name:<8} "
                    f"{result.rps:>10.0f} req/s  p50 {_ms(result.p50_ms)}  p99 {_ms(result.p99_ms)}"
                    f"  errors {result.errors}",
                    flush=True,
                )
    return results, gateway_requests


def metering_checks(
    before: dict[str, float], after: dict[str, float], completed: int, in_flight_bound: int
) -> list[Check]:
    """The gateway must have metered every request wrk saw answered, and none as failed."""
    grown = after.get("success", 0.0) - before.get("success", 0.0)
    others = {k: v - before.get(k, 0.0) for k, v in after.items() if k != "success"}
    return [
        Check(
            "metergate_requests_total{outcome=success} grew by at least wrk's completed requests",
            grown >= completed,
            f"grew by {grown:.0f}, wrk completed {completed}",
        ),
        report.outcomes_check(others, in_flight_bound),
    ]


def shutdown_checks(exit_code: int, log: Path, ledger: Path, metered: float) -> list[Check]:
    """After a clean stop: exit status, errors in the gateway's log, ledger rows written."""
    text = log.read_text(errors="replace")
    problems = [
        line
        for line in text.splitlines()
        if "Traceback" in line or " ERROR " in line or "CRITICAL" in line
    ]
    with contextlib.closing(sqlite3.connect(ledger)) as db:
        rows = db.execute("SELECT count(*) FROM requests WHERE outcome = 'success'").fetchone()[0]
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15 is clean too.
    clean = exit_code in (0, -signal.SIGTERM) and "ledger flushed" in text
    return [
        Check(
            "gateway shut down gracefully on SIGTERM (ledger flushed)",
            clean,
            f"exit status {exit_code}",
        ),
        Check("no error or traceback in the gateway's log", not problems, "; ".join(problems[:3])),
        Check(
            "ledger holds one success row per metered success after shutdown",
            rows == metered,
            f"{rows} rows, {metered:.0f} metered",
        ),
    ]


def summarize(results: Results, loads: list[Load]) -> list[Row]:
    saturation, latency = loads
    direct = _median(results[("direct", saturation.name)], "rps")
    through = _median(results[("gateway", saturation.name)], "rps")
    rows = [
        Row(
            f"requests/s, {saturation.connections} connections",
            f"{direct:,.0f}",
            f"{through:,.0f}",
            f"{through / direct:.3f}x",
        )
    ]
    for field in ("p50_ms", "p99_ms"):
        direct = _median(results[("direct", latency.name)], field)
        through = _median(results[("gateway", latency.name)], field)
        rows.append(
            Row(
                f"{field[:3]} latency, 1 connection",
                f"{direct:.3f} ms",
                f"{through:.3f} ms",
                f"+{through - direct:.3f} ms added",
            )
        )
    return rows


def _median(results: list[wrk.WrkResult], field: str) -> float:
    return float(statistics.median(getattr(result, field) for result in results))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}ms"


def run_rows(results: Results) -> list[list[str]]:
    rows = []
    for (target, load), runs in results.items():
        for index, r in enumerate(runs, 1):
            rows.append(
                [
                    target,
                    load,
                    str(index),
                    str(r.requests),
                    f"{r.rps:,.0f}",
                    _ms(r.p50_ms).removesuffix("ms"),
                    _ms(r.p99_ms).removesuffix("ms"),
                    str(r.errors),
                ]
            )
    return sorted(rows, key=lambda row: (row[1], row[0], row[2]))


def benchmark(args: argparse.Namespace, workdir: Path, layout: CpuLayout) -> tuple[str, bool]:
    """Start nginx and metergate, check them, measure, check metering.

    Returns the markdown report and whether every required check passed.
    """
    loads = [Load(f"{args.connections} connections", args.connections), Load("1 connection", 1)]
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, workdir, layout.upstream)
        config = gw.write_config(workdir, nginx.port)
        key = gw.create_key(config)

        def run(target: str, url: str, load: Load, seconds: int) -> wrk.WrkResult:
            token = key if target == "gateway" else DIRECT_TOKEN
            return wrk.run(
                url, connections=load.connections, seconds=seconds, token=token, cpus=layout.client
            )

        gateway = gw.start_gateway(processes, config, layout.gateway)
        targets = {
            "direct": nginx.base + upstream.CHAT_PATH,
            "gateway": gateway.base + "/v1/chat/completions",
        }
        checks = verify(targets, targets["gateway"], key)
        before = gw.requests_by_outcome(gateway)
        results, completed = measure(targets, loads, args, run)
        after = gw.requests_by_outcome(gateway)
        # each gateway run (and its warm-up) may leave its connections' requests in flight
        in_flight = args.connections + args.runs * sum(load.connections for load in loads)
        checks += metering_checks(before, after, completed, in_flight)
        errors = sum(
            r.errors for (target, _), runs in results.items() for r in runs if target == "gateway"
        )
        checks.append(
            Check(
                "wrk saw no non-2xx answer or socket error from the gateway",
                not errors,
                f"{errors}",
            )
        )
        exit_code = processes.stop(gateway.process)
        checks += shutdown_checks(
            exit_code, gateway.process.log, workdir / "ledger.db", after.get("success", 0)
        )

    method = (
        f"wrk -t1 POSTs a small chat completion request (bench/wrk/post.lua) to nginx directly "
        f"and through metergate (1 worker, every feature on: key auth, metrics, SQLite "
        f"ledger, prices, a hard budget). "
        f"Saturation: -c{args.connections}; latency: -c1 with --latency percentiles. "
        f"Each run lasts {args.duration} s, after a {args.warmup} s warm-up per target; "
        f"medians of {args.runs} runs, direct and gateway interleaved."
    )
    return report.render(
        "metergate overhead against a fixed nginx upstream",
        method,
        summarize(results, loads),
        run_rows(results),
        checks,
        report.environment(layout.describe()),
    ), all(c.ok for c in checks if c.required)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_exit()
    procs.ensure_tools()
    layout = cpu_layout(not args.no_pin)
    # Under /tmp and world-readable: nginx's worker runs as `nobody` when started as root.
    workdir = Path(tempfile.mkdtemp(prefix="metergate-bench-"))
    workdir.chmod(0o755)
    passed = False
    try:
        text, passed = benchmark(args, workdir, layout)
        print("\n" + text)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"written to {args.output}")
        if not passed:
            print("benchmark FAILED: see the checks above", file=sys.stderr)
    except procs.BenchError as error:
        print(f"benchmark FAILED: {error}", file=sys.stderr)
    return procs.finish(workdir, passed, args.keep)


if __name__ == "__main__":
    sys.exit(main())
