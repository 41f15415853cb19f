"""The console and the budgets on a busy ledger: how long their reads of the ledger take
at `--per-day` requests a day for `--days` days, for this tree and (optionally) another
commit, on the same rows.

    .venv/bin/python bench/console_scale.py [--per-day 200000] [--days 30] [--baseline REV]

The rows are written straight into a SQLite ledger (time order, as the ledger writer
appends them) over `--keys` keys, 3 teams and 4 models, with the costs and latencies a
chat service would have; then each gateway is started on a copy of it (its own CLI
migrates the schema first, so a migration that fills a table is timed too) with one
budget per scope and a budget for each key, and the console's pages are read: the
overview for each window, the upstreams page at 24 h and 30 d, the keys and teams pages,
and `usage` for the month. Medians
of `--reads` reads after a first one. `bench/results/console-scale.md`.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from benchlib import baseline, report
from benchlib import gateway as gw
from benchlib.procs import Processes
from benchlib.report import table

BENCH = Path(__file__).resolve().parent
ADMIN_KEY = "mgadmin-console-scale-bench"
MODELS = ("chat-small", "chat-large", "embed", "reason")
TEAMS = ("search", "support", None)
PAGES = (
    ("overview 1h", "/admin/api/overview?window=1h"),
    ("overview 24h", "/admin/api/overview?window=24h"),
    ("overview 7d", "/admin/api/overview?window=7d"),
    ("overview 30d", "/admin/api/overview?window=30d"),
    ("upstreams 24h", "/admin/api/upstreams?window=24h"),
    ("upstreams 30d", "/admin/api/upstreams?window=30d"),
    ("keys", "/admin/api/keys"),
    ("teams", "/admin/api/teams"),
    # the Teams page's spend panel (without p95 since 3a665bf; a tree before it answers
    # 400 to `p95`, and its panel asked without it)
    ("teams: spend by team 24h", "/admin/api/usage?by=team&window=24h&p95=false"),
    ("teams: spend by team 30d", "/admin/api/usage?by=team&window=30d&p95=false"),
    ("usage by model 30d, with p95", "/admin/api/usage?by=model&window=30d"),
)
COLUMNS = (
    "ts, request_id, key_name, model, upstream, attempts, input_tokens, cached_input_tokens, "
    "output_tokens, cost_nano, saved_nano, duration_ms, ttft_ms, outcome, status, cache_hit, "
    "stream, usage_estimated, api, team, tags"
)

INSERT = f"INSERT INTO requests ({COLUMNS}) VALUES ({', '.join('?' * 21)})"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-day", type=int, default=200_000, help="requests a day (200000)")
    parser.add_argument("--days", type=int, default=30, help="days of ledger, to now (30)")
    parser.add_argument("--keys", type=int, default=500, help="keys the requests come from")
    parser.add_argument("--reads", type=int, default=3, help="timed reads of each page (3)")
    parser.add_argument("--baseline", default=None, help="also measure this commit's metergate")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "console-scale.md")
    return parser.parse_args(argv)


def write_config(workdir: Path) -> Path:
    sim = {"type": "simulated", "simulated": {"latency_ms": 0}}
    config = {
        "server": {"host": "127.0.0.1", "port": 4000},
        "ledger": {"url": f"sqlite:///{workdir / 'ledger.db'}"},
        "providers": {"sim": sim},
        "upstreams": {
            f"{m}-up": {"provider": "sim", "model": m, "price": dict(gw.PRICE)} for m in MODELS
        },
        "models": {m: {"upstreams": [f"{m}-up"]} for m in MODELS},
        "budgets": {
            "monthly": {"limit_usd": 1_000_000, "hard": False},
            "large-model": {"scope": "model", "target": "chat-large", "limit_usd": 1_000_000},
            "search-team": {"scope": "team", "target": "search", "limit_usd": 1_000_000},
            "per-key": {"scope": "key", "target": "*", "period": "day", "limit_usd": 1_000},
        },
        "admin": {"api_key": ADMIN_KEY},
    }
    path = workdir / "metergate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def seed(ledger: Path, args: argparse.Namespace) -> int:
    """Rows for `args.days` days up to now, in time order; return how many."""
    rng = random.Random(7)
    keys = [f"user-{n}" for n in range(args.keys)]
    now = time.time()
    count = args.per_day * args.days
    step = args.days * 86_400 / count
    start = now - args.days * 86_400
    with sqlite3.connect(ledger) as connection:
        connection.executemany(
            "INSERT INTO keys (id, name, key_hash, hint, created_at, team) "
            f"VALUES (?, ?, ?, 'abcd', {start}, ?)",
            [(f"key_{n}", name, f"hash-{n}", TEAMS[n % 3]) for n, name in enumerate(keys)],
        )
        batch: list[tuple[object, ...]] = []
        for n in range(count):
            key = rng.randrange(args.keys)
            model = MODELS[n % len(MODELS)]
            stream = n % 3 == 0
            failed = rng.random() < 0.02
            tokens_in, tokens_out = rng.randrange(50, 2000), rng.randrange(10, 800)
            batch.append(
                (
                    start + n * step,
                    f"req-{n}",
                    keys[key],
                    model,
                    f"{model}-up",
                    1,
                    tokens_in,
                    0,
                    0 if failed else tokens_out,
                    0 if failed else tokens_in * 2_000 + tokens_out * 8_000,
                    0,
                    rng.lognormvariate(5.5, 0.6),
                    rng.lognormvariate(4.5, 0.5) if stream else None,
                    "upstream_error" if failed else "success",
                    502 if failed else 200,
                    0,
                    int(stream),
                    0,
                    "chat",
                    TEAMS[key % 3],
                    None,
                )
            )
            if len(batch) == 100_000:
                connection.executemany(INSERT, batch)
                batch = []
        if batch:
            connection.executemany(INSERT, batch)
        # rows written around the ledger writer: a schema with the spend by hour is put
        # back to the version before it, so the gateway's migration sums them (timed)
        if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'usage_hours'").fetchall():
            for table in ("usage_hours", "key_spend_hours", "latency_hours"):
                connection.execute(f"DROP TABLE {table}")
            connection.execute("DELETE FROM schema_migrations WHERE version = 12")
    return count


def timed(call) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def measure(install: gw.Install, seeded: Path, workdir: Path, reads: int) -> dict[str, float]:
    workdir.mkdir(parents=True)
    config = write_config(workdir)
    shutil.copy(seeded, workdir / "ledger.db")
    found: dict[str, float] = {}
    found["migrate (keys list)"] = timed(
        lambda: subprocess.run(
            install.command("keys", "list", "--config", str(config)),
            check=True,
            capture_output=True,
            env=install.env,
        )
    )
    with Processes() as processes:
        started = time.perf_counter()
        gateway = gw.start_gateway(processes, config, None, install=install, ready_timeout=600)
        found["start, to ready"] = (time.perf_counter() - started) * 1000
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.Client(base_url=gateway.base, headers=headers, timeout=600) as client:
            for name, path in PAGES:
                if client.get(path).status_code == 400 and "&p95=false" in path:
                    path = path.replace("&p95=false", "")  # as that tree asked
                client.get(path).raise_for_status()
                found[name] = statistics.median(
                    timed(lambda p=path: client.get(p).raise_for_status()) for _ in range(reads)
                )
    found["usage --since 30d"] = statistics.median(
        timed(
            lambda: subprocess.run(
                install.command("usage", "--config", str(config), "--since", "30d"),
                check=True,
                capture_output=True,
                env=install.env,
            )
        )
        for _ in range(reads)
    )
    return found


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    with tempfile.TemporaryDirectory(prefix="metergate-console-") as scratch:
        root = Path(scratch)
        targets: list[tuple[str, gw.Install]] = []
        commit, _ = baseline.head()
        if args.baseline:
            tree = baseline.export(args.baseline, root / "trees")
            targets.append((f"{args.baseline} ({tree.commit[:12]})", tree.install))
        targets.append((f"this tree ({commit})", gw.THIS_TREE))
        # the oldest schema of the targets makes the seeded file; each migrates its copy
        schema = root / "schema"
        schema.mkdir()
        gw.create_key(write_config(schema), targets[0][1])
        rows = seed(schema / "ledger.db", args)
        results = [
            (name, measure(install, schema / "ledger.db", root / f"run-{n}", args.reads))
            for n, (name, install) in enumerate(targets)
        ]
    steps = list(results[0][1])
    header = ["ms", *(name for name, _ in results)]
    body = [[step, *(f"{found[step]:,.0f}" for _, found in results)] for step in steps]
    lines = [
        f"# The console on a ledger of {rows:,} requests",
        "",
        f"`.venv/bin/python bench/console_scale.py {' '.join(given)}`".replace(" `", "`"),
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {args.per_day:,} requests a "
        f"day for {args.days} days over {args.keys} keys, SQLite; medians of {args.reads} "
        "reads after a first one.",
        "",
        table(header, body, "l" + "r" * len(results)),
        "",
    ]
    report.publish_measured(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
