"""A gateway with many keys: what keeping its key index fresh costs, idle and under load,
for this tree and (optionally) another commit, in the same run.

    .venv/bin/python bench/many_keys.py [--keys 100000] [--baseline REV] [--seconds 130]
    .venv/bin/python bench/many_keys.py --keys 10000 --key-labels name,team --seconds 10

Each gateway serves a simulated model (no upstream to run) from a SQLite ledger that
holds `--keys` keys, written straight into its `keys` table after its own CLI made the
schema. Measured: the gateway's CPU while idle (`--idle` seconds), then one connection
sending requests back to back for `--seconds` (longer than a minute, so it includes the
index's periodic full reads), its latency percentiles and maximum, its RSS, and its
`/metrics` while idle (size, lines, median of 3 scrapes). `--key-labels` measures this
tree once per `server.metrics_key_label` instead of against a baseline. Targets run one
after the other (the baseline first); everything listens on 127.0.0.1.
`bench/results/many-keys.md`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from benchlib import baseline, report
from benchlib import gateway as gw
from benchlib.procs import Processes
from benchlib.report import table

BENCH = Path(__file__).resolve().parent
MODEL = "sim"


@dataclass
class Result:
    name: str
    idle_cpu: float  # share of one core
    requests: int
    p50: float  # ms
    p99: float
    p999: float
    worst: float
    rss_mb: int
    metrics_mb: float
    metrics_lines: int
    scrape_ms: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the ledger (100000)")
    parser.add_argument("--baseline", default=None, help="also measure this commit's metergate")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU (10)")
    parser.add_argument("--seconds", type=float, default=130.0, help="seconds of requests (130)")
    parser.add_argument(
        "--key-labels",
        default=None,
        help="comma-separated metrics_key_label values to measure this tree with (not "
        "with --baseline)",
    )
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "many-keys.md")
    args = parser.parse_args(argv)
    if args.key_labels and args.baseline:
        parser.error("--key-labels measures this tree only: leave out --baseline")
    return args


def write_config(workdir: Path, key_label: str | None) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": 4000},
        "ledger": {"url": f"sqlite:///{workdir / 'ledger.db'}"},
        "providers": {"sim": {"type": "simulated", "simulated": {"latency_ms": 0}}},
        "upstreams": {"sim-up": {"provider": "sim", "model": "sim-model", "price": dict(gw.PRICE)}},
        "models": {MODEL: {"upstreams": ["sim-up"]}},
    }
    if key_label is not None:
        config["server"]["metrics_key_label"] = key_label
    path = workdir / "metergate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def add_keys(ledger: Path, count: int) -> None:
    """`count` keys, written as `keys create` would (hashed secrets nobody holds)."""
    rows = []
    for n in range(count):
        secret = "mgk_" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        tags = f'{{"customer":"c{n}"}}'
        rows.append((f"key_{secrets.token_hex(8)}", f"user-{n}", digest, secret[-4:], tags))
    with sqlite3.connect(ledger) as connection:
        connection.executemany(
            "INSERT INTO keys (id, name, key_hash, hint, created_at, tags) "
            f"VALUES (?, ?, ?, ?, {time.time()}, ?)",
            rows,
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def measure(
    name: str,
    install: gw.Install,
    key_label: str | None,
    args: argparse.Namespace,
    workdir: Path,
) -> Result:
    workdir.mkdir(parents=True)
    config = write_config(workdir, key_label)
    key = gw.create_key(config, install)  # also creates the schema of this tree
    add_keys(workdir / "ledger.db", args.keys)
    with Processes() as processes:
        gateway = gw.start_gateway(processes, config, None, install=install, ready_timeout=300)
        pid = gateway.process.popen.pid
        time.sleep(2)  # past the first refresh
        before = cpu_seconds(pid)
        time.sleep(args.idle)
        idle = (cpu_seconds(pid) - before) / args.idle
        scrapes: list[float] = []
        for _ in range(3):
            started = time.perf_counter()
            exposition = httpx.get(f"{gateway.base}/metrics", timeout=300).content
            scrapes.append((time.perf_counter() - started) * 1000)
        latencies: list[float] = []
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=gateway.base, headers=headers, timeout=60) as client:
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                answer = client.post("/v1/chat/completions", json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                answer.raise_for_status()
        memory = rss_mb(pid)
    latencies.sort()

    def at(share: float) -> float:
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))]

    return Result(
        name,
        idle,
        len(latencies),
        at(0.5),
        at(0.99),
        at(0.999),
        latencies[-1],
        memory,
        len(exposition) / 1e6,
        exposition.count(b"\n"),
        statistics.median(scrapes),
    )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    with tempfile.TemporaryDirectory(prefix="metergate-keys-") as scratch:
        root = Path(scratch)
        targets: list[tuple[str, gw.Install, str | None]] = []
        commit, _ = baseline.head()
        if args.key_labels:
            for label in args.key_labels.split(","):
                targets.append((f"this tree ({commit}), keys by {label}", gw.THIS_TREE, label))
        else:
            if args.baseline:
                tree = baseline.export(args.baseline, root / "trees")
                targets.append((f"{args.baseline} ({tree.commit[:12]})", tree.install, None))
            targets.append((f"this tree ({commit})", gw.THIS_TREE, None))
        results = [
            measure(name, install, label, args, root / f"run-{n}")
            for n, (name, install, label) in enumerate(targets)
        ]
    rows = [
        [
            r.name,
            f"{r.idle_cpu * 100:.1f} %",
            f"{r.requests:,}",
            f"{r.p50:.2f}",
            f"{r.p99:.2f}",
            f"{r.p999:.2f}",
            f"{r.worst:.1f}",
            f"{r.rss_mb}",
            f"{r.metrics_mb:.1f}",
            f"{r.metrics_lines:,}",
            f"{r.scrape_ms:.0f}",
        ]
        for r in results
    ]
    header = ["metergate", "idle CPU", "requests", "p50 ms", "p99 ms", "p99.9 ms", "max ms"]
    lines = [
        f"# A gateway with {args.keys:,} keys",
        "",
        f"`.venv/bin/python bench/many_keys.py {' '.join(given)}`".replace(" `", "`"),
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): idle CPU over "
        f"{args.idle:.0f} s, then one connection for {args.seconds:.0f} s, simulated upstream "
        f"(median p50 {statistics.median(r.p50 for r in results):.2f} ms).",
        "",
        table([*header, "RSS MB", "/metrics MB", "lines", "scrape ms"], rows, "lrrrrrrrrrr"),
        "",
    ]
    report.publish_measured(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
