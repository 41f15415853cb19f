"""The garbage collector's passes per request under concurrent load, metergate and another
commit's.

    .venv/bin/python bench/gc_pauses.py [--baseline REV] [--requests 30000] [--connections 64]

Each gateway runs with the suite's config and nginx upstream, with `benchlib/gchook` on
its PYTHONPATH: a `gc.callbacks` hook that counts the passes of each generation and times
them. After a warm-up, a fixed number of requests is sent over kept-alive connections
(each waiting for its answer) and the counts read before and after. The time is what the
passes took on the wall clock inside the process, so it moves with the machine's load;
the pass counts do not. Everything listens on 127.0.0.1; `bench/results/gc.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import baseline, callgrind, procs, report, upstream
from benchlib import gateway as gw
from benchlib.report import table
from benchlib.targets import UNARY_BODY

BENCH = Path(__file__).resolve().parent
HOOK = BENCH / "benchlib" / "gchook"
SETTLE_SECONDS = 1.5  # the hook writes its totals every 0.5 s


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="also measure this commit's metergate")
    parser.add_argument("--requests", type=int, default=30000, help="requests counted (30000)")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before counting")
    parser.add_argument("--connections", type=int, default=64, help="kept-alive connections")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "gc.md")
    return parser.parse_args(argv)


@dataclass
class Passes:
    name: str
    passes: list[int]  # per generation
    seconds: list[float]
    elapsed: float

    def row(self, requests: int) -> list[str]:
        per_thousand = [f"{count * 1000 / requests:.2f}" for count in self.passes]
        micros = [f"{seconds / requests * 1e6:.2f}" for seconds in self.seconds]
        return [
            self.name,
            " / ".join(per_thousand),
            f"{sum(self.seconds) / requests * 1e6:.2f}",
            " / ".join(micros),
            f"{requests / self.elapsed:,.0f}",
        ]


def measure(name: str, install: gw.Install, args: argparse.Namespace, workdir: Path) -> Passes:
    stats = workdir / f"{name}-gc.json"
    env = dict(install.env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(HOOK), env.get("PYTHONPATH"))))
    env["METERGATE_BENCH_GC_STATS"] = str(stats)
    hooked = gw.Install(install.cli, env)
    with procs.Processes() as processes:
        nginx = upstream.start_nginx(processes, workdir / name, None)
        config = gw.write_config(workdir / name, nginx.port)
        key = gw.create_key(config)
        gateway = gw.start_gateway(processes, config, None, install=hooked)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        load = (gateway.port, upstream.CHAT_PATH, headers, UNARY_BODY)
        callgrind.counted_load(*load, args.warmup, args.connections)
        before = _read_after_settling(stats)
        started = time.perf_counter()
        callgrind.counted_load(*load, args.requests, args.connections)
        elapsed = time.perf_counter() - started
        after = _read_after_settling(stats)
    passes = [b - a for a, b in zip(before["passes"], after["passes"], strict=True)]
    seconds = [b - a for a, b in zip(before["seconds"], after["seconds"], strict=True)]
    return Passes(name, passes, seconds, elapsed)


def _read_after_settling(stats: Path) -> dict[str, list[float]]:
    time.sleep(SETTLE_SECONDS)  # let the hook write what the last requests caused
    if not stats.exists():
        raise procs.BenchError(f"{stats} was not written: is {HOOK} on the gateway's path?")
    return json.loads(stats.read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="metergate-gc-"))
    workdir.chmod(0o755)
    for name in ("metergate", "baseline"):
        (workdir / name).mkdir()
    results = [measure("metergate", gw.THIS_TREE, args, workdir)]
    described = f"`{baseline.head()[0]}`"
    if args.baseline:
        tree = baseline.export(args.baseline, workdir / "trees")
        results.append(measure("baseline", tree.install, args, workdir))
        described += f"; baseline `{args.baseline}` = `{tree.commit[:12]}` ({tree.subject})"
    for result in results:
        print(f"{result.name}: passes gen0/1/2 {result.passes}, {sum(result.seconds):.3f} s")
    lines = [
        "# The collector's passes under concurrent load",
        "",
        f"- metergate: {described}",
        f"- {args.requests:,} requests after {args.warmup:,} to warm up, "
        f"{args.connections} kept-alive connections, nginx upstream, the suite's config; "
        "every request answered 200.",
        "",
        table(
            [
                "server",
                "passes per 1,000 requests (gen 0 / 1 / 2)",
                "gc µs per request",
                "by generation",
                "requests/s (load generator on the same machine)",
            ],
            [result.row(args.requests) for result in results],
            "lrrrr",
        ),
        "",
    ]
    report.publish_measured(lines, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
