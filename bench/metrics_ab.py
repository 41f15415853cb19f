"""Metrics A/B: the current tree against another commit, interleaved in the same run, on
what metrics cost: `/metrics` at 50 models x 200 keys and `serve --workers N` throughput.

    .venv/bin/python bench/metrics_ab.py --baseline main [--runs 5] [--duration 5]

- **Scrape**: for each tree, a gateway with 1 worker and one with 2 workers, filled with
  the scrape step's 50 models x 200 keys (`benchlib/scrape.py`: 10,000 requests, ~52,000
  samples); after a warm-up (the first scrape of a worker builds its caches: reported
  apart), `--scrapes` scrapes of each gateway per run, gateways interleaved, order
  alternating run by run; medians over all runs. Meanwhile a thread sends `GET /healthz`
  on 8 kept-alive connections (spread over the workers): the longest wait says how long
  a scrape held a worker's requests (`benchlib/scrape.HealthWatch`).
- **Requests/s**: for each tree, `serve --workers 1` and `--workers 2` with the workers
  step's config and placement (`benchlib/workers.py`: every feature on, the budget soft,
  an idle rollout; on 2 cores, 2 workers share a CPU with nginx and wrk), wrk -c64 for
  `--duration` s per run, interleaved the same way; then each variant's exactness checks
  (every answered request counted once across workers, one ledger row each).

- **Metric writes per request**: in a process of each tree, with PROMETHEUS_MULTIPROC_DIR
  set as `serve --workers N` sets it, the metric calls one answered request makes (the
  in-flight gauge, the attempt, the request, its duration and overhead histograms, tokens,
  cost, the budget gauge), timed over 20,000 requests; trees alternating, best of `--runs`
  rounds. Less noisy than requests/s on a shared machine.

The machine is shared: compare the ratios within the run. Report:
`bench/results/metrics-ab.md`. About 6 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import baseline, procs, report, scrape, workers
from benchlib import gateway as gw
from benchlib.report import Check, table

BENCH = Path(__file__).resolve().parent
CURRENT, BASELINE = "current", "baseline"
COUNTS = (1, 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="main", help="commit to compare with (main)")
    parser.add_argument("--runs", type=int, default=5, help="interleaved repetitions (5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--warmup", type=int, default=3, help="wrk warm-up seconds (3)")
    parser.add_argument("--connections", type=int, default=64, help="saturation load (64)")
    parser.add_argument("--scrapes", type=int, default=4, help="scrapes per gateway and run")
    parser.add_argument("--venv", action="store_true", help="install the baseline in a venv")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "metrics-ab.md")
    return parser.parse_args(argv)


# One answered request's metric calls, as Meter.finish and the handlers make them.
RECORD = """
import os, shutil, sys, tempfile, time
directory = tempfile.mkdtemp(prefix="metergate-record-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
from metergate.metering import metrics as module
metrics = module.Metrics()
labels = ("bench", "bench-upstream", "bench")
series = metrics.series(*labels)
active = metrics.active("bench")  # a gauge child, or (since 8678d99) its value
spent = metrics.budget_spent.labels("bench-total")
spent = getattr(module, "value_of", lambda child: child)(spent)  # as BudgetBook holds it
observe_overhead = getattr(metrics, "observe_overhead", metrics.overhead.observe)
count = 20_000
began = time.perf_counter()
for _ in range(count):
    active.inc(1)
    metrics.count_attempt("bench-upstream", "success")
    metrics.count_request(series, labels, "success", "chat")
    series.duration.observe(0.0012)
    observe_overhead(0.0002)
    series.tokens[0].inc(11)
    series.tokens[2].inc(7)
    series.cost.inc(0.000025)
    spent.set(1.5)
    active.inc(-1)
print((time.perf_counter() - began) / count * 1e9)
shutil.rmtree(directory)
"""


def measure_record(installs: dict[str, gw.Install], runs: int) -> dict[str, list[float]]:
    """ns of metric writes per request, per tree and round."""
    found: dict[str, list[float]] = {tree: [] for tree in installs}
    for index in range(runs):
        for tree, install in _alternating(list(installs.items()), index):
            python = install.cli[0] if install.cli else sys.executable
            done = subprocess.run(
                [python, "-c", RECORD], capture_output=True, text=True, timeout=300, env=install.env
            )
            if done.returncode != 0:
                raise procs.BenchError(f"{tree}: the metric writes failed:\n{done.stderr[-2000:]}")
            found[tree].append(float(done.stdout.strip()))
            print(f"round {index + 1}/{runs} {tree}: {found[tree][-1] / 1000:.2f} µs", flush=True)
    return found


@dataclass
class Scraped:
    tree: str
    workers: int
    samples: int = 0
    body_bytes: int = 0
    first_ms: list[float] = field(default_factory=list)  # the warm-up's, caches cold
    ms: list[float] = field(default_factory=list)
    first_wait_ms: float = 0.0  # the longest /healthz wait during the first scrapes
    wait_ms: float = 0.0  # ... during the timed ones


@dataclass
class Loaded:
    tree: str
    variant: workers.Variant
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def _alternating(items: list, index: int) -> list:
    return items if index % 2 == 0 else items[::-1]


def measure_scrapes(
    processes: procs.Processes,
    workdir: Path,
    installs: dict[str, gw.Install],
    cpus: tuple[int, ...],
    args: argparse.Namespace,
) -> list[Scraped]:
    filled: list[tuple[Scraped, scrape.Filled]] = []
    for tree, install in installs.items():
        for n in COUNTS:
            pinned = ",".join(map(str, cpus[:n])) if not args.no_pin else None
            print(f"{tree}: filling a {n}-worker gateway with 50 x 200 series", flush=True)
            done = scrape.fill(processes, workdir / f"{tree}-scrape-{n}", pinned, n, install)
            filled.append((Scraped(tree, n), done))
    for result, done in filled:  # every worker's first scrape: its caches are built
        result.first_ms, body, first_wait = scrape.time_scrapes(
            done.gateway, 4 * done.workers, watch=True
        )
        result.first_wait_ms = first_wait or 0.0
        result.samples, result.body_bytes = scrape.samples_in(body), len(body)
    for index in range(args.runs):
        for result, done in _alternating(filled, index):
            timings, _, waited = scrape.time_scrapes(done.gateway, args.scrapes, watch=True)
            result.ms += timings
            result.wait_ms = max(result.wait_ms, waited or 0.0)
            print(
                f"run {index + 1}/{args.runs} {result.tree} workers={result.workers}: "
                f"/metrics {statistics.median(timings):.1f} ms",
                flush=True,
            )
    for _, done in filled:
        processes.stop(done.gateway.process)
    return [result for result, _ in filled]


def measure_rps(
    processes: procs.Processes,
    workdir: Path,
    installs: dict[str, gw.Install],
    cpus: tuple[int, ...],
    args: argparse.Namespace,
) -> tuple[list[Loaded], list[Check]]:
    places = workers.placements(list(COUNTS), list(cpus), 1, not args.no_pin)
    loaded = []
    nginxes = []
    for tree, install in installs.items():
        nginx, variants = workers.start_variants(processes, workdir, places, install, tree)
        nginxes.append(nginx)
        loaded += [Loaded(tree, variant) for variant in variants]
    for entry in loaded:
        entry.variant.load(args.connections, args.warmup)
    for index in range(args.runs):
        for entry in _alternating(loaded, index):
            cpu = len(entry.variant.cpu_us)
            run = entry.variant.load(args.connections, args.duration)
            entry.rps.append(run.rps)
            entry.cpu_us += entry.variant.cpu_us[cpu:]
            n = entry.variant.placement.workers
            print(
                f"run {index + 1}/{args.runs} {entry.tree} workers={n}: {run.rps:,.0f}/s "
                f"errors {run.errors}",
                flush=True,
            )
    checks = []
    for entry in loaded:
        exact = workers.finish(processes, entry.variant)
        checks += [
            Check(f"{entry.tree}: {check.name}", check.ok, check.detail, check.required)
            for check in exact.checks()
        ]
    for nginx in nginxes:
        processes.stop(nginx.process)
    return loaded, checks


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(
    args: argparse.Namespace,
    tree: baseline.Tree,
    scraped: list[Scraped],
    loaded: list[Loaded],
    record: dict[str, list[float]],
    checks: list[Check],
    env: list[tuple[str, str]],
) -> str:
    head, _ = baseline.head()
    scrape_ms = {(s.tree, s.workers): _median(s.ms) for s in scraped}
    rps = {(e.tree, e.variant.placement.workers): _median(e.rps) for e in loaded}
    cpu = {(e.tree, e.variant.placement.workers): _median(e.cpu_us) for e in loaded}
    lines = [
        "# Metrics A/B: /metrics and serve --workers, current tree vs baseline",
        "",
        f"`.venv/bin/python bench/metrics_ab.py --baseline {args.baseline} --runs {args.runs} "
        f"--duration {args.duration} --scrapes {args.scrapes}`",
        "",
        f"- current: {head}",
        f"- baseline: {args.baseline} = {tree.commit[:12]} ({tree.subject}), run with {tree.how}",
        "",
        "## /metrics at 50 models x 200 keys",
        "",
        f"Medians of {args.runs} interleaved runs x {args.scrapes} scrapes per gateway "
        "(client-timed, a new connection each); the first scrapes (caches cold, one per "
        "worker at least) apart.",
        "",
        table(
            ["gateway", "samples", "MB", "baseline (ms)", "current (ms)", "current/baseline"],
            [
                [
                    f"{n} worker{'s' if n > 1 else ''}",
                    f"{next(s.samples for s in scraped if s.workers == n):,}",
                    f"{next(s.body_bytes for s in scraped if s.workers == n) / 1e6:.1f}",
                    f"{scrape_ms[(BASELINE, n)]:.1f}",
                    f"{scrape_ms[(CURRENT, n)]:.1f}",
                    f"{scrape_ms[(CURRENT, n)] / scrape_ms[(BASELINE, n)]:.3f}x",
                ]
                for n in COUNTS
            ],
            "lrrrrr",
        ),
        "",
        table(
            ["tree", "workers", "first scrapes (ms)", "every timed scrape (ms)"],
            [
                [
                    s.tree,
                    str(s.workers),
                    ", ".join(f"{v:.0f}" for v in s.first_ms),
                    ", ".join(f"{v:.0f}" for v in s.ms),
                ]
                for s in scraped
            ],
            "lrll",
        ),
        "",
        "What a scrape holds: the longest a `GET /healthz` waited while the scrapes ran "
        "(sent in turn on 8 kept-alive connections, opened before the scrapes so that "
        "they are spread over the workers, from a thread of this script).",
        "",
        table(
            ["tree", "workers", "during the first scrapes (ms)", "during the timed ones (ms)"],
            [
                [s.tree, str(s.workers), f"{s.first_wait_ms:.1f}", f"{s.wait_ms:.1f}"]
                for s in scraped
            ],
            "lrrr",
        ),
        "",
        "## serve --workers N, requests/s (wrk -c64)",
        "",
        f"Medians of {args.runs} interleaved runs of {args.duration} s; "
        f"{loaded[0].variant.placement.describe()} / {loaded[1].variant.placement.describe()}; "
        "CPU per request is the whole gateway's (every worker) over the saturated runs.",
        "",
        table(
            [
                "tree",
                "1 worker (/s)",
                "2 workers (/s)",
                "2 / 1",
                "CPU µs/request, 1 worker",
                "CPU µs/request, 2 workers",
            ],
            [
                [
                    name,
                    f"{rps[(name, 1)]:,.0f}",
                    f"{rps[(name, 2)]:,.0f}",
                    f"{rps[(name, 2)] / rps[(name, 1)]:.2f}x",
                    f"{cpu[(name, 1)]:.0f}",
                    f"{cpu[(name, 2)]:.0f}",
                ]
                for name in (BASELINE, CURRENT)
            ],
            "lrrrrr",
        ),
        "",
        "current / baseline: "
        + ", ".join(
            f"{n} worker{'s' if n > 1 else ''} {rps[(CURRENT, n)] / rps[(BASELINE, n)]:.3f}x "
            f"requests/s, {cpu[(CURRENT, n)] / cpu[(BASELINE, n)]:.3f}x CPU per request"
            for n in COUNTS
        ),
        "",
        table(
            ["tree", "workers", "requests/s, every run"],
            [
                [e.tree, str(e.variant.placement.workers), ", ".join(f"{v:,.0f}" for v in e.rps)]
                for e in loaded
            ],
            "lrl",
        ),
        "",
        "## Metric writes per request, multi-process mode, in process",
        "",
        f"Best of {args.runs} rounds of 20,000 requests (`RECORD` in bench/metrics_ab.py).",
        "",
        table(
            ["tree", "µs per request", "every round (µs)"],
            [
                [
                    name,
                    f"{min(record[name]) / 1000:.2f}",
                    ", ".join(f"{v / 1000:.2f}" for v in record[name]),
                ]
                for name in (BASELINE, CURRENT)
            ],
            "lrl",
        ),
        "",
        f"current / baseline: {min(record[CURRENT]) / min(record[BASELINE]):.3f}x",
        "",
        *report.checks_and_environment(checks, env),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_exit()
    procs.ensure_tools()
    layout = procs.cpu_layout(not args.no_pin)
    if layout.other is not None:  # the scrapes' client: off the 1-worker gateways' CPU
        os.sched_setaffinity(0, {int(c) for c in layout.other.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-metrics-ab-"))
    workdir.chmod(0o755)  # nginx's worker runs as `nobody` when started as root
    passed = False
    started = time.monotonic()
    try:
        env = report.environment(layout.describe())
        tree = baseline.export(args.baseline, workdir, venv=args.venv)
        print(f"baseline {args.baseline} = {tree.commit[:12]} ({tree.subject})", flush=True)
        installs = {CURRENT: gw.THIS_TREE, BASELINE: tree.install}
        record = measure_record(installs, args.runs)
        with procs.Processes() as processes:
            scraped = measure_scrapes(processes, workdir, installs, layout.cpus, args)
            loaded, checks = measure_rps(processes, workdir, installs, layout.cpus, args)
        env.append(("duration", f"{(time.monotonic() - started) / 60:.1f} min"))
        text = render(args, tree, scraped, loaded, record, checks, env)
        passed = report.publish(text, args.output, checks)
    except procs.BenchError as error:
        print(f"metrics A/B FAILED: {error}", file=sys.stderr)
    return procs.finish(workdir, passed, args.keep)


if __name__ == "__main__":
    sys.exit(main())
