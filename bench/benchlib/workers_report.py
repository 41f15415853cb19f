"""The workers section of the suite's report: scaling, exactness, the multi-process scrape,
SQLite with several writers, and where a worker's time goes under load."""

from __future__ import annotations

import math
import statistics

from benchlib import scrape as scrape_step
from benchlib.report import table
from benchlib.workers import CATEGORIES, EXACT_REQUESTS, Placement, WorkersResult

SCALE_PER_WORKER = 0.85  # the target: 2 workers >= 1.7x one worker's requests/s


def _median(values: list[float] | list[float | None]) -> float:
    found = [v for v in values if v is not None]
    return float(statistics.median(found)) if found else float("nan")


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def rps(result: WorkersResult, workers: int) -> float:
    return _median([r.rps for r in result.sat.get(workers, [])])


def ceiling(result: WorkersResult, place: Placement) -> float:
    """The requests/s `place`'s CPUs could make at the CPU per request measured."""
    n = place.workers
    gateway_us = _median(list(result.cpu_us.get(n, [])))
    rest_us = _median(list(result.rest_us.get(n, [])))
    if math.isnan(gateway_us) or math.isnan(rest_us) or gateway_us <= 0 or rest_us <= 0:
        return float("nan")
    return place.ceiling(gateway_us, rest_us)


def targets(
    result: WorkersResult, single: scrape_step.ScrapeResult | None
) -> list[tuple[str, bool, str]]:
    """Scaling per worker count above one, and the multi-process scrape against the
    single-process one of the same run."""
    found = []
    one = rps(result, 1)
    for place in result.placements:
        n = place.workers
        if n == 1 or math.isnan(one):
            continue
        times = rps(result, n) / one if one else float("nan")
        wanted = SCALE_PER_WORKER * n
        note = " (wrk and nginx shared the workers' CPUs)" if place.shared else ""
        cpu_one, cpu_n = (
            _median(list(result.cpu_us.get(1, []))),
            _median(list(result.cpu_us.get(n, []))),
        )
        if not math.isnan(cpu_one) and not math.isnan(cpu_n):
            note += f"; gateway CPU per request {cpu_n:.0f} µs vs {cpu_one:.0f} µs"
        first = next((p for p in result.placements if p.workers == 1), None)
        if first is not None:
            most = ceiling(result, place) / ceiling(result, first)
            if not math.isnan(most):
                note += f"; these CPUs' ceiling {most:.2f}x"
        found.append(
            (
                f"{n} workers ≥ {wanted:.1f}x one worker's requests/s",
                times >= wanted,
                f"{times:.2f}x: {rps(result, n):,.0f}/s vs {one:,.0f}/s{note}",
            )
        )
    for s in result.scrapes:
        if single is None:
            continue
        found.append(
            (
                f"/metrics with {s.workers} workers (multi-process files) as fast as with one "
                "(50 models x 200 keys, same run)",
                s.median_ms <= single.median_ms,
                f"{s.median_ms:.1f} ms vs {single.median_ms:.1f} ms single-process",
            )
        )
    return found


def section(result: WorkersResult) -> list[str]:
    one = rps(result, 1)
    rows = []
    for place in result.placements:
        n = place.workers
        sat, single = result.sat.get(n, []), result.one.get(n, [])
        most = ceiling(result, place)
        rows.append(
            [
                str(n),
                place.describe(),
                _f(rps(result, n), 0),
                f"{rps(result, n) / one:.2f}x" if one and not math.isnan(one) else "n/a",
                f"{_f(_median([r.p50_ms for r in sat]))} / {_f(_median([r.p99_ms for r in sat]))}",
                f"{_f(_median([r.p50_ms for r in single]))} / "
                f"{_f(_median([r.p99_ms for r in single]))}",
                _f(_median(list(result.cpu_us.get(n, []))), 0),
                _f(_median(list(result.rest_us.get(n, []))), 0),
                f"{_f(most, 0)} ({_f(100 * rps(result, n) / most, 0)} %)",
            ]
        )
    c = result.connections
    lines = [
        "## Scaling with cores: `metergate serve --workers N`",
        "",
        "Same config for every N: the suite's (key auth, metrics, SQLite ledger, prices) "
        "with the budget soft (held and settled in the workers' shared table as a hard "
        "one; older trees refused hard budgets with several workers) and a rollout on a "
        "model no load uses (its controller takes the lease every second). Medians of "
        "interleaved runs (`bench/benchlib/workers.py`).",
        "",
        table(
            [
                "workers",
                "placement",
                f"requests/s (wrk -c{c})",
                "vs 1 worker",
                f"p50 / p99 at -c{c} (ms)",
                "p50 / p99 at 1 connection (ms)",
                "gateway CPU per request (µs)",
                "other CPU per request (µs)",
                "ceiling, requests/s (reached)",
            ],
            rows,
            "llrrrrrrr",
        ),
        "",
        "Gateway CPU per request: user + system time of every worker (and the supervisor) "
        "over each saturated run, from /proc, divided by the requests wrk completed. Equal "
        "for every N means the workers cost each other nothing per request. Other CPU per "
        "request: what else the placement's CPUs were busy with over the same runs "
        "(/proc/stat: nginx, wrk, the kernel's network work), per request. Ceiling: the "
        "requests/s those CPUs could make at these costs, the gateway's CPUs full when they "
        "are its own (N / gateway), every CPU full when nginx and wrk share them (CPUs / "
        "(gateway + other)); a shortfall against it is the workers', the rest the machine's.",
        "",
        "### Exactness (checked in the same run)",
        "",
        table(
            [
                "workers",
                "wrk completed",
                "counted during wrk (≤ + in flight)",
                f"{EXACT_REQUESTS:,} sent one by one: counted",
                "ledger success rows",
                "counted in all",
            ],
            [
                [
                    str(e.workers),
                    f"{e.wrk_completed:,}",
                    f"{e.counted_during_wrk:,.0f} (≤ +{e.in_flight_bound})",
                    f"{e.exact_counted:,.0f}",
                    f"{e.ledger_rows:,}",
                    f"{e.counted_total:,.0f}",
                ]
                for e in result.exactness
            ],
            "lrrrrr",
        ),
        "",
    ]
    if result.scrapes:
        lines += [
            "### `/metrics` in multi-process mode (50 models x 200 keys)",
            "",
            "The scrape as a client sees it; then, timed in the suite's process on the "
            "gateway's own metric files, prometheus_client's render in halves (reading and "
            "merging every worker's mmap files with `MultiProcessCollector`, then "
            "formatting with `generate_latest`: what the gateway used before) and "
            "metergate's merged view (`metering/multiprocess_exposition.py`), its first "
            "render and every later one.",
            "",
            table(
                [
                    "workers",
                    "scrape median (ms)",
                    "samples",
                    "MB",
                    "collect (ms)",
                    "format (ms)",
                    "merged: first / later (ms)",
                    "metric files",
                ],
                [
                    [
                        str(s.workers),
                        _f(s.median_ms, 1),
                        f"{s.series:,}",
                        f"{s.body_bytes / 1e6:.1f}",
                        _f(s.render.collect_ms, 1) if s.render else "n/a",
                        _f(s.render.format_ms, 1) if s.render else "n/a",
                        f"{_f(s.render.merged_first_ms, 1)} / {_f(s.render.merged_ms, 1)}"
                        if s.render and s.render.merged_ms is not None
                        else "n/a",
                        f"{s.render.files} ({s.render.file_bytes / 1e6:.1f} MB)"
                        if s.render
                        else "n/a",
                    ]
                    for s in result.scrapes
                ],
                "lrrrrrrr",
            ),
            "",
        ]
    if result.ledger:
        lines += [
            "### SQLite with several writer processes",
            "",
            "metergate's LedgerWriter in N processes on one SQLite file (WAL), appending "
            "their share of the rows at once (`ledger_rate.sqlite_processes`); compare with "
            "the one-process row of the main table.",
            "",
            table(
                ["writers", "rows", "rows/s", "commits", "max pending in a writer"],
                [
                    [
                        r.backend,
                        f"{r.rows:,}",
                        _f(r.rows_per_second, 0),
                        str(r.commits),
                        f"{r.max_pending:,}",
                    ]
                    for r in result.ledger
                ],
                "lrrrr",
            ),
            "",
        ]
    if result.profile is not None:
        p = result.profile
        lines += [
            f"### Where one of {p.workers} workers' time goes under load",
            "",
            f"py-spy --gil on worker pid {p.pid} while wrk -c{c} drove the gateway at "
            f"{p.rps:,.0f} requests/s; {p.samples:,} busy samples. Inclusive shares of what "
            "running several workers adds or shares:",
            "",
            table(
                ["share", "what"],
                [[f"{100 * p.shares[name]:.1f}%", name] for name in CATEGORIES],
                "rl",
            ),
            "",
            table(
                ["inclusive", "function", "file"],
                [
                    [f"{100 * count / (p.samples or 1):.1f}%", f"`{function}`", f"`{file}`"]
                    for (function, file), count in p.top[:15]
                ],
                "rll",
            ),
            "",
        ]
    return lines
