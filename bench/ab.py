"""A/B: the current tree against another commit of metergate, interleaved in the same run.

    .venv/bin/python bench/ab.py --baseline HEAD~1 [--runs 5] [--duration 5] [--venv] [--redis]

So that a change can be shown to cost no throughput "compared in the same run against
the previous commit": the baseline commit is exported with `git archive` into a
throwaway directory (`benchlib/baseline.py`) and run from there; both gateways get the
suite's config (every feature on), their own ledger and key, the same CPU (one loaded at
a time) and the same nginx upstream (with `--redis`, one redis-server too, which keeps
both sides' budgets and rate limits under their own key prefixes), and are measured on
the core workloads, their order alternating run by run:

- requests/s at saturation (wrk -c64), and the gateway's CPU time per request over
  those runs (from /proc: less disturbed than requests/s by what else runs);
- p50 and p99 at 1 connection;
- p99 at about half load (the connection count that gives the current tree half its
  max, the same count for both);
- time to first chunk of a stream, p50 (the suite's asyncio probe).

Reports medians, the spread of the runs and current/baseline ratios in
`bench/results/ab.md`. About 4 minutes with the defaults. Everything listens on
127.0.0.1, every load is bounded in time, and every process started here is stopped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import baseline, procfs, procs, redis_server, report, upstream, wrk
from benchlib import gateway as gw
from benchlib.measure import half_load_connections, ttft_once
from benchlib.outcome import TtftRun
from benchlib.report import Check, table
from benchlib.targets import STREAM_BODY, UNARY_BODY, Target

BENCH = Path(__file__).resolve().parent
CURRENT, BASELINE = "current", "baseline"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD~1", help="commit to compare with (HEAD~1)")
    parser.add_argument(
        "--current",
        default=None,
        help="measure this commit as the current side instead of the working tree "
        "(compare two commits, e.g. a change's before and after)",
    )
    parser.add_argument("--runs", type=int, default=5, help="interleaved repetitions (5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds per tree (3)")
    parser.add_argument("--connections", type=int, default=64, help="saturation load (64)")
    parser.add_argument("--ttft-requests", type=int, default=300, help="probe streams per run")
    parser.add_argument("--venv", action="store_true", help="install the baseline in a venv")
    parser.add_argument(
        "--redis",
        action="store_true",
        help="keep both sides' budgets and rate limits in one redis-server (own key prefixes)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "ab.md")
    return parser.parse_args(argv)


@dataclass
class Side:
    """One tree under test and its runs."""

    target: Target
    sat: list[wrk.WrkResult] = field(default_factory=list)
    one: list[wrk.WrkResult] = field(default_factory=list)
    half: list[wrk.WrkResult] = field(default_factory=list)
    ttft: list[TtftRun] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # gateway CPU per request, saturated

    def saturate(self, connections: int, seconds: int, cpus: str | None) -> wrk.WrkResult:
        """The saturation run, and the gateway's CPU time per request over it (/proc):
        less moved than requests/s by what else runs on this machine."""
        assert self.target.pid is not None
        before = procfs.cpu_seconds(self.target.pid)
        result = self.load(connections, seconds, cpus)
        used = procfs.cpu_seconds(self.target.pid) - before
        self.cpu_us.append(used / max(result.requests, 1) * 1e6)
        return result

    def load(self, connections: int, seconds: int, cpus: str | None) -> wrk.WrkResult:
        t = self.target
        return wrk.run(t.unary, connections=connections, seconds=seconds, token=t.token, cpus=cpus)


def answers_checks(sides: dict[str, Side]) -> list[Check]:
    checks = []
    for name, side in sides.items():
        t = side.target
        unary = procs.http(t.unary, UNARY_BODY, t.http_headers("unary"))
        stream = procs.http(t.stream, STREAM_BODY, t.http_headers("stream"))
        if unary.status != 200 or stream.status != 200:
            raise procs.BenchError(f"{name} answered {unary.status} / {stream.status}")
        checks.append(
            Check(
                f"{name} answers 200 with the upstream body and stream byte for byte",
                unary.body == upstream.CHAT_BODY and stream.body == upstream.STREAM_BODY,
                f"{len(unary.body)} / {len(stream.body)} bytes",
                required=False,  # an older tree may legitimately differ; still measured
            )
        )
    return checks


def measure(
    sides: dict[str, Side], args: argparse.Namespace, cpus: str | None
) -> tuple[int, list[tuple[int, float]]]:
    """Warm both up, find the half-load count on the current tree, then the runs."""
    warm = {name: side.load(args.connections, args.warmup, cpus) for name, side in sides.items()}
    for side in sides.values():
        ttft_once(side.target, 50)
    half, tried = half_load_connections(sides[CURRENT].target, warm[CURRENT].rps, 2, cpus)
    for index in range(args.runs):
        order = list(sides) if index % 2 == 0 else list(sides)[::-1]
        for name in order:
            side = sides[name]
            side.sat.append(side.saturate(args.connections, args.duration, cpus))
            side.one.append(side.load(1, args.duration, cpus))
            side.half.append(side.load(half, args.duration, cpus))
            side.ttft.append(ttft_once(side.target, args.ttft_requests))
            print(
                f"run {index + 1}/{args.runs} {name:<8} {side.sat[-1].rps:>8.0f}/s "
                f"p50@1 {side.one[-1].p50_ms or 0:.3f} ms p99@1 {side.one[-1].p99_ms or 0:.3f} ms "
                f"p99@-c{half} {side.half[-1].p99_ms or 0:.3f} ms "
                f"first chunk p50 {side.ttft[-1].p50_ms:.3f} ms",
                flush=True,
            )
    return half, tried


def rows(sides: dict[str, Side], half: int, connections: int) -> list[list[str]]:
    def values(side: Side, metric: str) -> list[float]:
        pick = {
            "rps": [r.rps for r in side.sat],
            "cpu": side.cpu_us,
            "p50@1": [r.p50_ms or float("nan") for r in side.one],
            "p99@1": [r.p99_ms or float("nan") for r in side.one],
            "p99@half": [r.p99_ms or float("nan") for r in side.half],
            "ttft": [t.p50_ms for t in side.ttft],
        }
        return pick[metric]

    labels = {
        "rps": (f"requests/s, wrk -c{connections}", 0, "higher"),
        "cpu": (f"gateway CPU per request at -c{connections} (µs)", 0, "lower"),
        "p50@1": ("p50 at 1 connection (ms)", 3, "lower"),
        "p99@1": ("p99 at 1 connection (ms)", 3, "lower"),
        "p99@half": (f"p99 at about half load, -c{half} (ms)", 3, "lower"),
        "ttft": ("stream: time to first chunk p50, 1 connection (ms)", 3, "lower"),
    }
    out = []
    for metric, (label, digits, better) in labels.items():
        a, b = values(sides[CURRENT], metric), values(sides[BASELINE], metric)
        ma, mb = statistics.median(a), statistics.median(b)
        out.append(
            [
                label,
                f"{ma:,.{digits}f}",
                f"{mb:,.{digits}f}",
                f"{ma / mb:.3f}x" if mb else "n/a",
                better,
                f"{min(a):,.{digits}f} to {max(a):,.{digits}f}",
                f"{min(b):,.{digits}f} to {max(b):,.{digits}f}",
            ]
        )
    return out


def _commit(rev: str) -> str:
    return baseline._git("rev-parse", "--verify", f"{rev}^{{commit}}")


def _subject(rev: str) -> str:
    return baseline._git("log", "-1", "--format=%s", _commit(rev))


def render(
    args: argparse.Namespace,
    tree: baseline.Tree,
    sides: dict[str, Side],
    half: int,
    tried: list[tuple[int, float]],
    checks: list[Check],
    env: list[tuple[str, str]],
) -> str:
    current, subject = baseline.head()
    if args.current is not None:
        current = f"{args.current}` = `{_commit(args.current)[:12]}"
        subject = _subject(args.current)
    calibration = ", ".join(f"-c{c} {r:,.0f}/s" for c, r in tried)
    lines = [
        "# A/B: the current tree against an earlier commit, same run",
        "",
        f"- current: `{current}` ({subject})",
        f"- baseline: `{args.baseline}` = `{tree.commit[:12]}` ({tree.subject}), run via "
        f"{tree.how}",
        "",
        f"Medians of {args.runs} runs of {args.duration} s, the two trees interleaved (order "
        "alternating run by run), same config (every feature on"
        + ("; budgets and rate limits in one redis-server" if args.redis else "")
        + "), same CPU, same nginx. "
        f"Reproduce: `.venv/bin/python bench/ab.py --baseline {args.baseline}"
        + (" --venv" if args.venv else "")
        + (" --redis" if args.redis else "")
        + "`.",
        "",
        table(
            [
                "workload",
                "current",
                "baseline",
                "current / baseline",
                "better",
                "current, runs",
                "baseline, runs",
            ],
            rows(sides, half, args.connections),
            "lrrrlrr",
        ),
        "",
        f"Half load: {half} connection(s), the count closest to half of the current tree's "
        f"max in 2 s trials ({calibration}); the same count for both.",
        "",
        *report.checks_and_environment(checks, env),
    ]
    runs = []
    for name, side in sides.items():
        for index, (s, o, h, t) in enumerate(
            zip(side.sat, side.one, side.half, side.ttft, strict=True), 1
        ):
            runs.append(
                [
                    name,
                    str(index),
                    f"{s.rps:,.0f}",
                    f"{o.p50_ms or 0:.3f}",
                    f"{o.p99_ms or 0:.3f}",
                    f"{h.p99_ms or 0:.3f}",
                    f"{t.p50_ms:.3f}",
                ]
            )
    header = ["tree", "run", "requests/s", "p50@1", "p99@1", f"p99@-c{half}", "first chunk p50"]
    lines += ["", "## Every run", "", table(header, runs, "llrrrrr"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_signal_exit()
    procs.ensure_tools()
    layout = procs.cpu_layout(not args.no_pin)
    if layout.other is not None:  # the probe runs here: keep it off the gateways' CPU
        os.sched_setaffinity(0, {int(c) for c in layout.other.split(",")})
    workdir = Path(tempfile.mkdtemp(prefix="metergate-ab-"))
    workdir.chmod(0o755)  # nginx's worker runs as `nobody` when started as root
    passed = False
    started = time.monotonic()
    try:
        env = report.environment(layout.describe())
        tree = baseline.export(args.baseline, workdir / "baseline-tree", venv=args.venv)
        print(f"baseline {args.baseline} = {tree.commit[:12]} ({tree.subject})", flush=True)
        current = gw.THIS_TREE
        if args.current is not None:
            other = baseline.export(args.current, workdir / "current-tree", venv=args.venv)
            print(f"current {args.current} = {other.commit[:12]} ({other.subject})", flush=True)
            current = other.install
        with procs.Processes() as processes:
            nginx = upstream.start_nginx(processes, workdir, layout.other)
            redis_url = redis_server.start(processes, workdir) if args.redis else None
            sides = {}
            for name, install in ((CURRENT, current), (BASELINE, tree.install)):
                home = workdir / name
                home.mkdir()
                config = gw.write_config(home, nginx.port)
                if redis_url is not None:
                    config = redis_server.with_redis(config, redis_url, config, f"{name}:")
                key = gw.create_key(config, install)
                gateway = gw.start_gateway(processes, config, layout.gateway, install=install)
                chat = gateway.base + upstream.CHAT_PATH
                sides[name] = Side(Target(name, key, chat, chat, chat, gateway.process.popen.pid))
            checks = answers_checks(sides)
            half, tried = measure(sides, args, layout.other)
            for name, side in sides.items():
                errors = sum(r.errors for r in (*side.sat, *side.one, *side.half))
                bad = sum(t.count - t.complete for t in side.ttft)
                checks.append(
                    Check(
                        f"{name}: no wrk or stream error",
                        not errors and not bad,
                        f"{errors} wrk, {bad} streams",
                    )
                )
        env.append(("duration", f"{(time.monotonic() - started) / 60:.1f} min"))
        text = render(args, tree, sides, half, tried, checks, env)
        passed = report.publish(text, args.output, checks)
    except procs.BenchError as error:
        print(f"A/B FAILED: {error}", file=sys.stderr)
    return procs.finish(workdir, passed, args.keep)


if __name__ == "__main__":
    sys.exit(main())
