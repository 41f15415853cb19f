"""How much of the latency at one connection is the client CPU waking from idle.

    .venv/bin/python bench/wakeups.py [--runs 5] [--duration 4]

At one connection a proxy's request crosses CPUs four times (wrk -> proxy -> nginx ->
proxy -> wrk); wrk and nginx share the other CPU, which goes idle while the proxy works,
and the proxy's CPU goes idle while it waits. On a VM, waking an idle vCPU costs the
host a wake-up of its thread: the `write()` that wakes it pays part of that, and the
request waits for the rest. Direct nginx never crosses CPUs (wrk and nginx share one),
so "gateway - direct" includes these wake-ups.

This runs the suite's 1-connection load on metergate, the floor proxy and direct nginx
three times per run, interleaved: with every CPU idle between requests (as in the
suite); with the client's CPU kept busy by a spinning process at the lowest priority
(`nice -n 19`), which yields to wrk and nginx but keeps that vCPU from going idle; and
with a spinner on the gateway's CPU as well. The differences are what the machine's
idle wake-ups add; a diagnosis of the machine, not a way of measuring the gateway (the
suite never runs spinners). Writes bench/results/wakeups.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import gateway as gw
from benchlib import procs, report, upstream, wrk
from benchlib.report import Check, table
from benchlib.targets import DIRECT, DIRECT_TOKEN, FLOOR_LABEL, METERGATE, start_floor

BENCH = Path(__file__).resolve().parent
IDLE, CLIENT, BOTH = "idle between requests", "client CPU kept busy", "both CPUs kept busy"
CONDITIONS = (IDLE, CLIENT, BOTH)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved repetitions (5)")
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "wakeups.md")
    return parser.parse_args(argv)


def spinners(cpus: list[str]) -> list[subprocess.Popen[bytes]]:
    """A busy loop at the lowest priority on each of `cpus`."""
    loop = [sys.executable, "-c", "while True: pass"]
    return [subprocess.Popen(["nice", "-n", "19", *procs.pinned(loop, cpu)]) for cpu in cpus]


def measure(
    urls: dict[str, tuple[str, str]], runs: int, seconds: int, layout: procs.CpuLayout
) -> dict[tuple[str, str], list[wrk.WrkResult]]:
    assert layout.gateway is not None and layout.other is not None
    cpus = layout.other
    busy = {IDLE: [], CLIENT: [cpus], BOTH: [cpus, layout.gateway]}
    results: dict[tuple[str, str], list[wrk.WrkResult]] = {}
    for index in range(runs):
        for condition in CONDITIONS if index % 2 == 0 else CONDITIONS[::-1]:
            spinning = spinners(busy[condition])
            try:
                for name, (url, token) in urls.items():
                    result = wrk.run(url, connections=1, seconds=seconds, token=token, cpus=cpus)
                    results.setdefault((name, condition), []).append(result)
                    print(
                        f"run {index + 1}/{runs} {name:<9} {condition}: p50 "
                        f"{result.p50_ms or 0:.3f} ms",
                        flush=True,
                    )
            finally:
                for process in spinning:
                    process.kill()
                    process.wait()
    return results


def render(
    results: dict[tuple[str, str], list[wrk.WrkResult]],
    args: argparse.Namespace,
    checks: list[Check],
    env: list[tuple[str, str]],
) -> str:
    def p50(name: str, condition: str) -> float:
        return statistics.median(r.p50_ms or float("nan") for r in results[(name, condition)])

    rows = []
    for name in (METERGATE, FLOOR_LABEL, DIRECT):
        cells = []
        for condition in CONDITIONS:
            value = p50(name, condition)
            added = f" (+{value - p50(DIRECT, condition):.3f})" if name != DIRECT else ""
            cells.append(f"{value:.3f}{added}")
        rows.append([name, *cells])
    lines = [
        "# Latency at one connection: the client CPU's idle wake-ups",
        "",
        f"wrk -c1, {args.duration} s per run, medians of {args.runs} runs, the three conditions "
        "interleaved (order reversed every other run); every proxy pinned to its CPU, nginx "
        "and wrk on the other. Reproduce: `.venv/bin/python bench/wakeups.py`. Why: the "
        "docstring of `bench/wakeups.py`.",
        "",
        table(
            ["target: p50 in ms (added vs direct)", *CONDITIONS], rows, "l" + "r" * len(CONDITIONS)
        ),
        "",
        *report.checks_and_environment(checks, env),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_exit()
    procs.ensure_tools()
    layout = procs.cpu_layout(True)
    if layout.gateway is None or layout.other is None:
        print("needs two CPUs and taskset: the point is which CPU goes idle", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="metergate-wakeups-"))
    workdir.chmod(0o755)  # nginx's worker runs as `nobody` when started as root
    passed = False
    started = time.monotonic()
    try:
        env = report.environment(layout.describe())
        with procs.Processes() as processes:
            nginx = upstream.start_nginx(processes, workdir, layout.other)
            config = gw.write_config(workdir, nginx.port)
            key = gw.create_key(config)
            gateway = gw.start_gateway(processes, config, layout.gateway)
            floor, _ = start_floor(
                processes, workdir, nginx.base + upstream.CHAT_PATH, layout.gateway
            )
            urls = {
                METERGATE: (gateway.base + upstream.CHAT_PATH, key),
                FLOOR_LABEL: (floor, "x"),
                DIRECT: (nginx.base + upstream.CHAT_PATH, DIRECT_TOKEN),
            }
            for url, token in urls.values():  # warm up
                wrk.run(url, connections=1, seconds=2, token=token, cpus=layout.other)
            results = measure(urls, args.runs, args.duration, layout)
        errors = sum(r.errors for runs in results.values() for r in runs)
        checks = [Check("no wrk error in any run", not errors, str(errors))]
        env.append(("duration", f"{(time.monotonic() - started) / 60:.1f} min"))
        passed = report.publish(render(results, args, checks, env), args.output, checks)
    except procs.BenchError as error:
        print(f"wake-ups FAILED: {error}", file=sys.stderr)
    return procs.finish(workdir, passed, False)


if __name__ == "__main__":
    sys.exit(main())
