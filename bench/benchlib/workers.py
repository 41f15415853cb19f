"""Scaling with cores: `metergate serve --workers N` for several N in one run, with metrics
and ledger checked exact, and what the workers cost each other.

Placement (`placements`): the gateway with N workers is pinned with `taskset` to the first
N CPUs the run may use, and a private nginx and wrk (`-t` = their CPU count) to the last
`client_cpus` CPUs. When N + client_cpus exceeds the CPUs (N = 2 on a 2-core machine),
the client's CPUs are also gateway CPUs: the report says so, since the workers then share
a CPU with nginx and wrk and cannot scale fully. The N variants are started together and
loaded one at a time, interleaved run by run like the rest of the suite.

The config is the suite's (key auth, metrics, SQLite ledger, prices) with the budget soft
(`hard: false`: a soft budget is reserved and settled per request as a hard one is, in
the table the workers share, and trees from before that table, which `metrics_ab.py`
runs as baselines, refused hard budgets with several workers) and, so that the rollout
controller's lease runs as it would in production, a rollout on a model no load uses.
The same config for every N, so N = 1 is the baseline the others are compared with.

Exactness, per N, in the same run:
- after the wrk loads, exactly `EXACT_REQUESTS` requests are sent with the asyncio client
  (all answered); `metergate_requests_total{outcome="success"}` summed over workers (a
  scrape of any worker reads every worker's file) must grow by exactly that many;
- over the wrk loads, the counter must lie between the requests wrk saw completed and
  that plus the connections open when each wrk run stopped (those requests may have been
  answered after wrk stopped reading): a request counted twice, or lost, falls outside;
- after a graceful stop, the ledger holds exactly one success row per counted success.
  (With one worker its log must also say "ledger flushed"; spawned workers do not inherit
  `serve`'s INFO logging, so with several the line is not logged, only counted if seen.)
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchlib import gateway as gw
from benchlib import ledger_rate, probe, procfs, procs, profile, scrape, upstream, wrk
from benchlib.ledger_rate import LedgerRate
from benchlib.report import Check, outcomes_check
from benchlib.scrape import ScrapeResult
from benchlib.targets import UNARY_BODY

EXACT_REQUESTS = 2000
CANARY_MODEL = "bench-canary"  # carries the rollout; never loaded


@dataclass(frozen=True)
class Placement:
    workers: int
    gateway_cpus: str | None
    client_cpus: str | None
    client_threads: int
    shared: bool  # the client's CPUs are gateway CPUs too

    @property
    def cpus(self) -> list[int] | None:
        """Every CPU the gateway, nginx and wrk may run on (None: not pinned, all)."""
        if self.gateway_cpus is None or self.client_cpus is None:
            return None
        both = f"{self.gateway_cpus},{self.client_cpus}".split(",")
        return sorted({int(cpu) for cpu in both})

    def ceiling(self, gateway_us: float, rest_us: float) -> float:
        """Requests/s these CPUs could make at these CPU costs per request: the gateway's
        CPUs full when they are its own, all of them full when nginx and wrk share them
        (`rest_us`: what else those CPUs did per request)."""
        cpus = self.cpus
        if cpus is None or self.shared:
            return (len(cpus) if cpus else os.cpu_count() or 1) / (gateway_us + rest_us) * 1e6
        clients = len(self.client_cpus.split(",")) if self.client_cpus else 1
        return min(self.workers / gateway_us, clients / rest_us) * 1e6

    def describe(self) -> str:
        if self.gateway_cpus is None:
            return f"{self.workers} worker(s), not pinned"
        text = (
            f"{self.workers} worker(s) on CPU {self.gateway_cpus}; nginx and wrk "
            f"-t{self.client_threads} on CPU {self.client_cpus}"
        )
        return text + (" (shared with the workers)" if self.shared else "")


def placements(counts: list[int], cpus: list[int], client_cpus: int, pin: bool) -> list[Placement]:
    """Gateways on the first N of `cpus`, nginx and wrk on the last `client_cpus`."""
    client = cpus[-client_cpus:] if client_cpus < len(cpus) else cpus[-1:]
    out = []
    for n in counts:
        if not pin:
            out.append(Placement(n, None, None, len(client), False))
            continue
        mine = cpus[: min(n, len(cpus))]
        out.append(
            Placement(
                n,
                ",".join(map(str, mine)),
                ",".join(map(str, client)),
                len(client),
                bool(set(mine) & set(client)),
            )
        )
    return out


def write_config(workdir: Path, upstream_port: int) -> Path:
    """The suite's gateway config with the budget soft and a rollout on an idle model."""
    raw = yaml.safe_load(gw.write_config(workdir, upstream_port).read_text())
    for budget in raw["budgets"].values():
        budget["hard"] = False
    raw["models"][CANARY_MODEL] = {"upstreams": [f"{gw.MODEL}-upstream"]}
    raw["rollouts"] = {
        "canary": {
            "model": CANARY_MODEL,
            "baseline": [f"{gw.MODEL}-upstream"],
            "candidate": [f"{gw.STREAM_MODEL}-upstream"],
            "interval_seconds": 4,  # the controller ticks (takes the lease) every second
        }
    }
    path = workdir / "metergate.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass
class Variant:
    """One `serve --workers N` under test, and what was counted against it."""

    placement: Placement
    gateway: gw.Gateway
    key: str
    ledger: Path
    pids: list[int]
    sat: list[wrk.WrkResult] = field(default_factory=list)
    one: list[wrk.WrkResult] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # gateway CPU per request, per -c run
    rest_us: list[float] = field(default_factory=list)  # the CPUs' other work per request
    completed: int = 0  # requests wrk saw answered, warm-up included
    in_flight_bound: int = 0  # connections open when each wrk run stopped, summed

    @property
    def url(self) -> str:
        return self.gateway.base + upstream.CHAT_PATH

    def load(self, connections: int, seconds: int) -> wrk.WrkResult:
        p = self.placement
        cpu = procfs.cpu_seconds(self.gateway.process.popen.pid)
        busy = procfs.cpus_busy_seconds(p.cpus)
        result = wrk.run(
            self.url,
            connections=connections,
            seconds=seconds,
            token=self.key,
            cpus=p.client_cpus,
            threads=min(p.client_threads, connections),
        )
        self.completed += result.requests
        if connections > 1 and result.requests:
            used = procfs.cpu_seconds(self.gateway.process.popen.pid) - cpu
            everything = procfs.cpus_busy_seconds(p.cpus) - busy
            self.cpu_us.append(used / result.requests * 1e6)
            self.rest_us.append((everything - used) / result.requests * 1e6)
        self.in_flight_bound += connections
        return result


@dataclass
class Exactness:
    workers: int
    wrk_completed: int
    in_flight_bound: int
    counted_during_wrk: float
    exact_sent: int
    exact_counted: float
    other_outcomes: dict[str, float]
    ledger_rows: int
    counted_total: float
    flushed_workers: int
    log_problems: list[str]
    exit_code: int

    def checks(self) -> list[Check]:
        n = self.workers
        return [
            Check(
                f"{n} worker(s): metergate_requests_total (summed over workers) grew by exactly "
                f"the {self.exact_sent:,} requests sent one by one",
                self.exact_counted == self.exact_sent,
                f"grew by {self.exact_counted:.0f}",
            ),
            Check(
                f"{n} worker(s): every request wrk saw answered counted once (between wrk's "
                "completed and that plus the requests in flight when each run stopped)",
                self.wrk_completed
                <= self.counted_during_wrk
                <= self.wrk_completed + self.in_flight_bound,
                f"counted {self.counted_during_wrk:.0f}, wrk completed {self.wrk_completed:,}, "
                f"at most {self.in_flight_bound} in flight",
            ),
            outcomes_check(self.other_outcomes, self.in_flight_bound, f"{n} worker(s): "),
            Check(
                f"{n} worker(s): the ledger holds one success row per counted success after "
                "a graceful stop",
                self.ledger_rows == self.counted_total
                and (self.flushed_workers >= 1 or n > 1)
                and self.exit_code in (0, -15),
                f"{self.ledger_rows:,} rows, {self.counted_total:.0f} counted, "
                f"{self.flushed_workers} 'ledger flushed', exit {self.exit_code}",
            ),
            Check(
                f"{n} worker(s): no error or traceback in metergate's log",
                not self.log_problems,
                "; ".join(self.log_problems[:3]),
            ),
        ]


def start_variants(
    processes: procs.Processes,
    workdir: Path,
    places: list[Placement],
    install: gw.Install = gw.THIS_TREE,
    name: str = "workers",
) -> tuple[upstream.Upstream, list[Variant]]:
    """A private nginx on the client CPUs, and one gateway (of `install`'s tree) per
    worker count; `name` tells their directories from another tree's."""
    nginx = upstream.start_nginx(processes, workdir / f"{name}-nginx", places[0].client_cpus)
    variants = []
    for place in places:
        home = workdir / f"{name}-{place.workers}"
        home.mkdir(parents=True, exist_ok=True)
        config = write_config(home, nginx.port)
        key = gw.create_key(config, install)
        gateway = gw.start_gateway(
            processes, config, place.gateway_cpus, workers=place.workers, install=install
        )
        ledger = home / "ledger.db"
        pids = gw.wait_workers(gateway, place.workers, ledger)
        variants.append(Variant(place, gateway, key, ledger, pids))
    return nginx, variants


def settled_success(gateway: gw.Gateway, timeout: float = 10) -> dict[str, float]:
    """The outcome counters once they stop moving (requests wrk left in flight finish)."""
    last = gw.requests_by_outcome(gateway)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = gw.requests_by_outcome(gateway)
        if now == last:
            return now
        last = now
    return last


def exact_requests(variant: Variant, count: int = EXACT_REQUESTS) -> int:
    """Send `count` requests over 16 connections; fail unless every one is answered 200."""
    _, _, raw = probe.build_request(variant.url, UNARY_BODY, variant.key)
    statuses = probe.run(
        probe.spray("127.0.0.1", variant.gateway.port, [raw] * count, connections=16)
    )
    bad = sum(1 for status in statuses if status != 200)
    if bad:
        raise procs.BenchError(f"{bad} of {count} requests to {variant.placement.workers} failed")
    return count


def finish(processes: procs.Processes, variant: Variant) -> Exactness:
    """Count, stop gracefully, and compare counter, wrk and ledger."""
    during = settled_success(variant.gateway)
    sent = exact_requests(variant)
    after = settled_success(variant.gateway)
    exit_code = processes.stop(variant.gateway.process)
    text = variant.gateway.process.log.read_text(errors="replace")
    problems = [
        line
        for line in text.splitlines()
        if "Traceback" in line or " ERROR " in line or "CRITICAL" in line
    ]
    with contextlib.closing(sqlite3.connect(variant.ledger)) as db:
        rows = db.execute("SELECT count(*) FROM requests WHERE outcome = 'success'").fetchone()[0]
    others = {k: v for k, v in after.items() if k != "success" and v}
    return Exactness(
        workers=variant.placement.workers,
        wrk_completed=variant.completed,
        in_flight_bound=variant.in_flight_bound,
        counted_during_wrk=during.get("success", 0.0),
        exact_sent=sent,
        exact_counted=after.get("success", 0.0) - during.get("success", 0.0),
        other_outcomes=others,
        ledger_rows=rows,
        counted_total=after.get("success", 0.0),
        flushed_workers=text.count("ledger flushed"),
        log_problems=problems,
        exit_code=exit_code,
    )


# Where a worker's time goes that is about running several of them: (label, test on a
# frame's file or function).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "multiprocess metric values (mmap writes per inc/observe)": (
        "prometheus_client/mmap_dict.py",
        "prometheus_client/values.py",
        "metergate/metering/multiprocess.py",
        "metergate/metering/mmapfile.py",
    ),
    "ledger (LedgerWriter, aiosqlite)": ("metergate/metering/ledger.py", "aiosqlite/"),
    "key reloads (KeyIndex.reload every 2 s)": ("KeyIndex.reload", "KeyIndex._refresh_forever"),
    "rollout controller (lease, state)": ("metergate/rollout/",),
    "budgets (soft: reserve and settle)": ("metergate/budgets/",),
    "/metrics render": (
        "prometheus_client/multiprocess.py",
        "metergate/metering/exposition.py",
        "metergate/metering/multiprocess_exposition.py",
    ),
}


@dataclass(frozen=True)
class WorkerProfile:
    workers: int
    pid: int
    rps: float
    samples: int
    shares: dict[str, float]  # category -> share of busy samples
    top: list[tuple[tuple[str, str], int]]
    raw: Path


def profile_worker(variant: Variant, seconds: int, connections: int, out: Path) -> WorkerProfile:
    """py-spy (--gil) on one worker of `variant` while wrk loads the whole gateway."""
    pid = variant.pids[0]
    place = variant.placement
    recorder = profile.start(profile.py_spy(sys.executable), pid, seconds, out, place.client_cpus)
    time.sleep(0.5)  # py-spy attaches
    result = variant.load(connections, seconds)
    profile.finish(recorder, out)
    analysed = profile.analyse(out, top=25)
    shares = profile.shares(out, CATEGORIES)
    return WorkerProfile(
        place.workers, pid, result.rps, analysed.samples, shares, analysed.inclusive, out
    )


@dataclass
class WorkersResult:
    """Everything the workers step measured, for the report."""

    placements: list[Placement]
    connections: int
    sat: dict[int, list[wrk.WrkResult]] = field(default_factory=dict)
    one: dict[int, list[wrk.WrkResult]] = field(default_factory=dict)
    cpu_us: dict[int, list[float]] = field(default_factory=dict)  # per request, saturated
    rest_us: dict[int, list[float]] = field(default_factory=dict)  # nginx, wrk, kernel
    exactness: list[Exactness] = field(default_factory=list)
    profile: WorkerProfile | None = None
    scrapes: list[ScrapeResult] = field(default_factory=list)
    ledger: list[LedgerRate] = field(default_factory=list)


def measure(
    processes: procs.Processes,
    workdir: Path,
    counts: list[int],
    *,
    cpus: list[int],
    runs: int,
    duration: int,
    warmup: int,
    connections: int,
    client_cpus: int,
    pin: bool,
    profile_seconds: int,
    out_dir: Path,
    ledger_rows: int,
    scrapes: bool,
) -> tuple[WorkersResult, list[Check]]:
    """Load every worker count in turn, run after run; then count, profile and stop them;
    then, per worker count above one, the multi-process /metrics scrape at 50 models x
    200 keys and the ledger's rows/s with that many writer processes on one SQLite file."""
    nginx, variants = start_variants(processes, workdir, placements(counts, cpus, client_cpus, pin))
    result = WorkersResult([v.placement for v in variants], connections)
    for variant in variants:
        variant.load(connections, warmup)
    for index in range(runs):
        for variant in variants if index % 2 == 0 else variants[::-1]:
            n = variant.placement.workers
            for name, conns, into in (
                ("saturation", connections, result.sat),
                ("1 conn", 1, result.one),
            ):
                run = variant.load(conns, duration)
                into.setdefault(n, []).append(run)
                print(
                    f"run {index + 1}/{runs} workers={n} {name:<10} {run.rps:>9.0f}/s "
                    f"p50 {run.p50_ms or 0:.3f} ms p99 {run.p99_ms or 0:.3f} ms "
                    f"errors {run.errors}",
                    flush=True,
                )
    for variant in variants:  # warm-up and the saturated runs
        result.cpu_us[variant.placement.workers] = variant.cpu_us
        result.rest_us[variant.placement.workers] = variant.rest_us
    widest = variants[-1]
    if profile_seconds > 0 and widest.placement.workers > 1:
        raw = out_dir / f"workers-{widest.placement.workers}-profile.raw.txt"
        result.profile = profile_worker(widest, profile_seconds, connections, raw)
    checks = []
    for variant in variants:
        exact = finish(processes, variant)
        result.exactness.append(exact)
        checks += exact.checks()
        errors = sum(r.errors for r in (*result.sat[exact.workers], *result.one[exact.workers]))
        checks.append(
            Check(
                f"{exact.workers} worker(s): wrk saw no non-2xx answer or socket error",
                not errors,
                str(errors),
            )
        )
    processes.stop(nginx.process)
    for place in result.placements:
        if place.workers == 1:
            continue
        if scrapes:
            found, gateway = scrape.run(
                processes, workdir, place.gateway_cpus, workers=place.workers
            )
            processes.stop(gateway.process)
            result.scrapes.append(found)
            print(
                f"workers={place.workers}: /metrics median {found.median_ms:.1f} ms, "
                f"{found.series:,} samples",
                flush=True,
            )
        if ledger_rows:
            rate = ledger_rate.sqlite_processes(ledger_rows, place.workers)
            result.ledger.append(rate)
            print(f"{rate.backend}: {rate.rows_per_second:,.0f} rows/s", flush=True)
    return result, checks
